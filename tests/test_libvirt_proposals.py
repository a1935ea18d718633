"""The 2019 proposals beside the shipped API, on one engine (sim in-process): Eric Blake's
integer job ids and Daniel Berrangé's job objects; the shipped names keep libvirt's return
values."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

import jobcore.libvirt as libvirt
from jobcore.libvirt import proposals as P

PUSH = (
    "<domainbackup mode='push'><disks>"
    "<disk name='{disk}' type='file'><target file='/b/{tag}.qcow2'/></disk>"
    "<disk name='{other}' backup='no'/></disks></domainbackup>"
)


def push(disk: str, tag: str) -> str:
    return PUSH.format(disk=disk, other="vdb" if disk == "vda" else "vda", tag=tag)


def backup_id(xml: str) -> int:
    return int(etree.fromstring(xml.encode()).get("id", "0"))


@pytest.fixture
def dom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[libvirt.virDomain]:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    libvirt.registerErrorHandler(f=lambda ctx, err: None, ctx=None)
    conn = libvirt.open("sim:///default?rate=1048576")  # backups stay running
    yield conn.lookupByName("vm1")
    conn.close()
    libvirt.registerErrorHandler(None, None)


def test_the_shipped_names_keep_libvirts_return_values(dom: libvirt.virDomain) -> None:
    assert dom.backupBegin(push("vda", "s"), None) == 0
    assert "id=" not in dom.backupGetXMLDesc()
    assert "id" not in dom.jobStats()
    assert dom.abortJob() == 0


def test_blake_integer_ids(dom: libvirt.virDomain) -> None:
    blake = P.BlakeDomain(dom)
    first = blake.backupBegin(push("vda", "b1"))
    second = blake.backupBegin(push("vdb", "b2"))  # in parallel: another disk
    assert first > 0 and second > 0 and first != second
    assert backup_id(blake.backupGetXMLDesc(first)) == first
    assert blake.backupGetXMLDesc(0) == blake.backupGetXMLDesc(first)  # 0: the current one
    second_xml = etree.fromstring(blake.backupGetXMLDesc(second).encode())
    assert second_xml.get("id") == str(second)
    assert second_xml.xpath("disks/disk[@backup='yes']/@name") == ["vdb"]
    stats = blake.jobStats()
    assert stats[P.VIR_DOMAIN_JOB_ID] == first and stats["operation"] == 9
    with pytest.raises(libvirt.libvirtError) as exc:
        blake.backupEnd(first)  # a push that has not copied everything: ABORT needed
    assert exc.value.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
    assert blake.backupEnd(first, P.VIR_DOMAIN_BACKUP_END_ABORT) == 0
    assert blake.backupEnd(0, P.VIR_DOMAIN_BACKUP_END_ABORT) == 0  # now the second
    with pytest.raises(libvirt.libvirtError) as exc:
        blake.backupGetXMLDesc(0)
    assert exc.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_BACKUP
    with pytest.raises(libvirt.libvirtError) as exc:
        blake.backupGetXMLDesc(12345)
    assert exc.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_BACKUP


def test_berrange_job_objects(dom: libvirt.virDomain) -> None:
    berrange = P.BerrangeDomain(dom)
    job = berrange.backupBegin(push("vda", "j1"))
    assert isinstance(job, P.virDomainJob) and job.type() == P.VIR_DOMAIN_JOB_OBJECT_TYPE_BACKUP
    assert berrange.jobLookupByUUIDString(job.UUIDString()) == job
    assert berrange.jobLookupByUUID(job.UUID()) == job
    assert berrange.jobLookupByUUIDString(P.VIR_DOMAIN_JOB_LEGACY_UUID) == job  # the domain job
    assert job.stats()["operation"] == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
    assert job.info()[0] == libvirt.VIR_DOMAIN_JOB_UNBOUNDED and len(job.info()) == 12
    assert "<domainbackup" in berrange.backupGetXMLDesc(job)
    assert "<job type='backup'" in job.XMLDesc().replace('"', "'")
    pull = berrange.jobBegin("<job type='blockpull'><disk name='vdb'/></job>")
    assert pull.type() == P.VIR_DOMAIN_JOB_OBJECT_TYPE_BLOCKPULL
    assert set(berrange.listAllJobs()) == {job, pull}
    assert berrange.backupEnd(job, P.VIR_DOMAIN_BACKUP_END_ABORT) == 0
    assert job.free() == 0
    with pytest.raises(libvirt.libvirtError) as exc:
        job.UUIDString()
    assert exc.value.get_error_code() == libvirt.VIR_ERR_INVALID_ARG
