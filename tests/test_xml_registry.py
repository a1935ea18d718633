"""A type registered by a driver gets the universal <job> treatment: its schema fragment
is enforced, the common children are parsed for it, and re-registering rebuilds the
grammar."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from attrs import frozen
from lxml import etree

from jobcore.errors import XMLError
from jobcore.registry import Registry, registry
from jobcore.spec import JobOptions, JobType
from jobcore.types import JobTypeInfo
from jobcore.xml import format_job, parse_job
from jobcore.xml.common import build_bandwidth, parse_bandwidth

SNAPSHOT = JobType("test-snapshot")


@frozen
class SnapshotSpec:
    name: str
    path: str | None = None
    bandwidth: int | None = None
    uuid: uuid.UUID | None = None
    options: JobOptions = JobOptions()

    TYPE: ClassVar[JobType] = SNAPSHOT


FRAGMENT = """
<define name='job-test-snapshot'>
  <interleave>
    <element name='snapshot'>
      <attribute name='name'>
        <data type='string'><param name='pattern'>[a-z]+</param></data>
      </attribute>
      <optional><attribute name='path'><ref name='absFilePath'/></attribute></optional>
    </element>
    <optional><ref name='job-bandwidth'/></optional>
  </interleave>
</define>
"""


class SnapshotCodec:
    def __init__(self, schema: str) -> None:
        self.schema = schema

    def parse(self, job: etree._Element, uuid: uuid.UUID | None, options: JobOptions) -> Any:
        snap = job.find("snapshot")
        assert snap is not None
        bw = job.find("bandwidth")
        return SnapshotSpec(
            name=snap.get("name", ""),
            path=snap.get("path"),
            bandwidth=parse_bandwidth(bw) if bw is not None else None,
            uuid=uuid,
            options=options,
        )

    def format(self, spec: Any, job: etree._Element) -> None:
        snap = etree.SubElement(job, "snapshot")
        snap.set("name", spec.name)
        if spec.path is not None:
            snap.set("path", spec.path)
        if spec.bandwidth is not None:
            build_bandwidth(job, spec.bandwidth)


def _info(codec: SnapshotCodec) -> JobTypeInfo:
    return JobTypeInfo(
        SNAPSHOT, SnapshotSpec, codec, lambda spec, dom: (), domain_level=True, operation=6
    )


@pytest.fixture
def registered() -> Iterator[None]:
    saved = dict(registry._types)
    registry.register(_info(SnapshotCodec(FRAGMENT)), replace=True)
    try:
        yield
    finally:
        registry._types.clear()
        registry._types.update(saved)


def test_registered_type_round_trips(registered: None) -> None:
    u = uuid.uuid4()
    doc = (
        f"<job type='test-snapshot'><bandwidth unit='KiB/s'>4</bandwidth><queue/>"
        f"<uuid>{u}</uuid><snapshot name='nightly' path='/s'/></job>"
    )
    spec = parse_job(doc)
    assert spec == SnapshotSpec("nightly", "/s", 4096, u, JobOptions(queue=True))
    text = format_job(spec)
    assert text.startswith(f"<job type='test-snapshot'>\n  <uuid>{u}</uuid>\n  <queue/>\n")
    assert parse_job(text) == spec


def test_registered_schema_is_enforced_with_its_patterns(registered: None) -> None:
    with pytest.raises(XMLError) as err:
        parse_job("<job type='test-snapshot'><snapshot name='UPPER'/></job>")
    assert "snapshot" in str(err.value)
    with pytest.raises(XMLError) as err:
        parse_job("<job type='test-snapshot'><snapshot name='a' path='relative'/></job>")
    assert "path" in str(err.value) or "snapshot" in str(err.value)
    with pytest.raises(XMLError):
        parse_job("<job type='test-snapshot'/>")  # <snapshot> is required
    with pytest.raises(XMLError):
        parse_job("<job type='test-snapshot'><snapshot name='a'/><disk name='vda'/></job>")


def test_reregistering_rebuilds_the_grammar(registered: None) -> None:
    assert parse_job("<job type='test-snapshot'><snapshot name='a'/></job>").name == "a"
    looser = FRAGMENT.replace("[a-z]+", "[A-Z]+")
    registry.register(_info(SnapshotCodec(looser)), replace=True)
    assert parse_job("<job type='test-snapshot'><snapshot name='UP'/></job>").name == "UP"
    with pytest.raises(XMLError):
        parse_job("<job type='test-snapshot'><snapshot name='a'/></job>")


def test_unregistered_type_is_an_xml_error() -> None:
    with pytest.raises(XMLError) as err:
        parse_job("<job type='test-snapshot'><snapshot name='a'/></job>")
    assert "test-snapshot" in str(err.value)
    with pytest.raises(XMLError):
        format_job(SnapshotSpec("a"))


FIRST_USE_RACE = """
import threading
from jobcore.registry import registry

N = 8
barrier = threading.Barrier(N)
errors = []


def lookup():
    barrier.wait()  # all at once, on the registry's very first use
    try:
        registry.get("backup")
    except Exception as exc:
        errors.append(repr(exc))


threads = [threading.Thread(target=lookup) for _ in range(N)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(errors), errors[:1])
"""


def test_first_use_of_the_registry_from_many_threads_at_once() -> None:
    """A fresh process each time: the registry has the built-in types from its import on."""
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-c", FIRST_USE_RACE],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert out.stdout.strip() == "0 []", out.stdout + out.stderr


def test_a_fresh_registry_holds_the_builtins_for_every_thread() -> None:
    fresh = Registry()
    barrier = threading.Barrier(8)
    found: list[str] = []

    def lookup() -> None:
        barrier.wait()
        found.append(str(fresh.get("backup").type))

    threads = [threading.Thread(target=lookup) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == ["backup"] * 8
    assert set(fresh.all()) == {"backup", "blockpull", "blockcommit", "migration"}
    assert set(Registry(()).all()) == set()  # a registry of no types, for tests
