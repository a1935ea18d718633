"""parse + validate of a backup job document against a raw lxml parse of the same bytes.

Run: ``.venv/bin/python -m benchmarks.bench_xml``. Prints per-call times of
  raw      ``lxml.etree.fromstring(doc)``
  validate jobcore's safe parse + RelaxNG validation of the ``<job>`` (what parse_job does
           before it builds the spec)
  parse    ``jobcore.xml.parse_job(doc)``: the above plus the typed spec
and the ratios to raw, for the backup document below (the figure issue 14 sets targets
for: validate/raw <= 2.0, parse/raw <= 4.0), then parse/raw for the other job types'
documents and a ``<jobgroup>`` of two backups (``parse_group``).

The three measures of one document are taken in turns, run after run, and each keeps its
best run: on a machine shared with other work, a busy moment then slows one run of each
rather than all runs of one measure. Every call parses the document from its bytes:
nothing is cached between calls.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from functools import partial

from lxml import etree

from jobcore.registry import registry
from jobcore.xml import parse_job
from jobcore.xml._parse import parse_document, validate
from jobcore.xml.group import parse_group
from jobcore.xml.job import job_schema

DOC = b"""<job type='backup'>
  <uuid>0b3c3a52-6d4e-4a8f-9b1c-2f6f8e0d4a17</uuid>
  <domainbackup mode='pull'>
    <incremental>1525889631</incremental>
    <server transport='tcp' tls='yes' name='localhost' port='10809'/>
    <disks>
      <disk name='vda' type='file' exportname='export-vda' exportbitmap='backup-vda'>
        <driver type='qcow2'/>
        <scratch file='/var/lib/backup/vda.scratch'/>
      </disk>
      <disk name='vdb' type='file' backupmode='full'>
        <scratch file='/var/lib/backup/vdb.scratch'/>
      </disk>
      <disk name='vdc' type='block' backupmode='incremental' incremental='1525111885'>
        <driver type='qcow2'/>
        <scratch dev='/dev/backup/vdc'/>
      </disk>
      <disk name='hda' backup='no'/>
    </disks>
  </domainbackup>
  <domaincheckpoint>
    <name>nightly-1525889999</name>
    <description>nightly incremental</description>
    <disks>
      <disk name='vda' checkpoint='bitmap'/>
      <disk name='vdb' checkpoint='bitmap' bitmap='nightly'/>
      <disk name='vdc' checkpoint='no'/>
    </disks>
  </domaincheckpoint>
</job>
"""

BLOCKPULL = b"""<job type='blockpull'>
  <uuid>5f0c8a9e-1d2b-4c3d-8e4f-a5b6c7d8e9f0</uuid>
  <queue timeout='30'/>
  <priority>5</priority>
  <disk name='vda'/>
  <base index='2'/>
  <top index='1'/>
  <bandwidth unit='MiB/s'>100</bandwidth>
</job>
"""

BLOCKCOMMIT = b"""<job type='blockcommit'>
  <uuid>6a1d9b0f-2e3c-4d4e-9f50-b6c7d8e9f0a1</uuid>
  <retention seconds='600'/>
  <disk name='vda'/>
  <top file='/var/lib/images/vm1-snap2.qcow2'/>
  <base file='/var/lib/images/vm1-base.qcow2'/>
  <pivot/>
  <delete/>
  <bandwidth unit='MiB/s'>200</bandwidth>
</job>
"""

MIGRATION = b"""<job type='migration'>
  <uuid>7b2eac10-3f4d-4e5f-a061-c7d8e9f0a1b2</uuid>
  <policy conflict='queue' requeue='yes'/>
  <destination uri='qemu+tls://dst.example.org/system'/>
  <live/>
  <persistent/>
  <undefine-source/>
  <bandwidth unit='GiB/s'>1</bandwidth>
  <downtime-limit unit='ms'>300</downtime-limit>
</job>
"""


def _group() -> bytes:
    members = []
    for n, vm in enumerate(("vm1", "vm2"), 1):
        body = DOC.decode().split("\n", 1)[1].rsplit("</job>", 1)[0]
        body = body.replace(
            "0b3c3a52-6d4e-4a8f-9b1c-2f6f8e0d4a17", f"0b3c3a52-6d4e-4a8f-9b1c-2f6f8e0d4a1{n}"
        )
        members.append(f"<job type='backup' domain='{vm}'>\n{body}</job>\n")
    return (
        "<jobgroup mode='all-or-nothing'>\n"
        "  <uuid>8c3fbd21-4a5e-4f60-b172-d8e9f0a1b2c3</uuid>\n" + "".join(members) + "</jobgroup>\n"
    ).encode()


GROUP = _group()


def _validated(doc: bytes) -> etree._Element:
    job = parse_document(doc, "job")
    validate(job_schema(registry.get("backup")), job, "job")
    return job


def _best_per_call_us(fns: list[Callable[[], object]], number: int, runs: int) -> list[float]:
    """Each of ``fns``' best time per call (µs) over ``runs`` runs of ``number`` calls, the
    functions taking turns run after run."""
    timers = [timeit.Timer(fn) for fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(runs):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], timer.timeit(number))
    return [b / number * 1e6 for b in best]


def main() -> None:
    parse_job(DOC)  # warm: compile and cache the schema
    number, runs = 1000, 25
    raw, checked, full = _best_per_call_us(
        [lambda: etree.fromstring(DOC), lambda: _validated(DOC), lambda: parse_job(DOC)],
        number,
        runs,
    )
    print(f"document: {len(DOC)} bytes, {number} calls x {runs} runs in turns, best run")
    print(f"raw lxml.etree.fromstring : {raw:8.2f} us/call")
    print(f"parse + validate          : {checked:8.2f} us/call  ratio {checked / raw:.2f}")
    print(f"parse_job (typed spec)    : {full:8.2f} us/call  ratio {full / raw:.2f}")
    print(
        f"target: parse + validate within 2.0x of raw -> "
        f"{'met' if checked / raw <= 2.0 else 'NOT met'}; "
        f"parse_job within 4.0x -> {'met' if full / raw <= 4.0 else 'NOT met'}"
    )
    print("other documents (parse/raw):")
    others: list[tuple[str, bytes, Callable[[bytes], object]]] = [
        ("blockpull", BLOCKPULL, parse_job),
        ("blockcommit", BLOCKCOMMIT, parse_job),
        ("migration", MIGRATION, parse_job),
        ("jobgroup of 2 backups", GROUP, parse_group),
    ]
    for name, doc, parse in others:
        parse(doc)
        raw, full = _best_per_call_us(
            [partial(etree.fromstring, doc), partial(parse, doc)], number, runs
        )
        print(
            f"  {name:22s} {len(doc):5d} bytes: raw {raw:7.2f} us, "
            f"parsed {full:7.2f} us, ratio {full / raw:.2f}"
        )


if __name__ == "__main__":
    main()
