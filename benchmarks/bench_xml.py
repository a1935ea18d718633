"""parse + validate of a backup job document against a raw lxml parse of the same bytes.

Run: ``.venv/bin/python -m benchmarks.bench_xml``. Prints per-call times of
  raw      ``lxml.etree.fromstring(doc)``
  validate jobcore's safe parse + RelaxNG validation of the ``<job>`` (what parse_job does
           before it builds the spec)
  parse    ``jobcore.xml.parse_job(doc)``: the above plus the typed spec
and the ratios to raw. Target: validate/raw <= 2.0.
"""

from __future__ import annotations

import timeit

from lxml import etree

from jobcore.registry import registry
from jobcore.xml import parse_job
from jobcore.xml._parse import parse_document, validate
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


def _validated(doc: bytes) -> etree._Element:
    job = parse_document(doc, "job")
    validate(job_schema(registry.get("backup")), job, "job")
    return job


def _per_call_us(fn: object, number: int, repeat: int = 7) -> float:
    timer = timeit.Timer(fn)  # type: ignore[arg-type]
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def main() -> None:
    parse_job(DOC)  # warm: compile and cache the schema
    number = 3000
    raw = _per_call_us(lambda: etree.fromstring(DOC), number)
    checked = _per_call_us(lambda: _validated(DOC), number)
    full = _per_call_us(lambda: parse_job(DOC), number)
    print(f"document: {len(DOC)} bytes, {number} calls x 7 runs, best run")
    print(f"raw lxml.etree.fromstring : {raw:8.2f} us/call")
    print(f"parse + validate          : {checked:8.2f} us/call  ratio {checked / raw:.2f}")
    print(f"parse_job (typed spec)    : {full:8.2f} us/call  ratio {full / raw:.2f}")
    print(
        f"target: parse + validate within 2.0x of raw -> "
        f"{'met' if checked / raw <= 2.0 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
