"""The job APIs proposed on libvir-list in 2019, in libvirt-python's style, on jobcore.

libvirt 6.0 shipped ``virDomainBackupBegin`` returning 0 and ``virDomainBackupGetXMLDesc``
(no job handle: the backup is the domain's one job, ended by ``virDomainAbortJob``); those
names keep exactly that on ``virDomain``. The two proposals live here, each in a namespace
of its own, on the same engine, so a client can be written against each and compared
(design/libvirt-proposals.md shows one client three ways):

- ``BlakeDomain`` (Eric Blake, backup series v7/v8, March–April 2019): ``backupBegin``
  returns a positive integer job id, visible as ``id`` in the backup XML and as
  ``VIR_DOMAIN_JOB_ID`` ("id") in ``jobStats``; id 0 means "the current backup job" in
  ``backupGetXMLDesc(id, flags)`` and ``backupEnd(id, flags)``.
- ``BerrangeDomain`` and ``virDomainJob`` (Daniel Berrangé's reply in that thread): job
  objects with ``UUIDString()``, ``type()``, ``XMLDesc()``, ``abort()``, ``info()``,
  ``stats()``, ``free()``; ``jobLookupByUUIDString()`` (the legacy alias UUID names the
  domain job), ``backupBegin`` returning a job, ``backupGetXMLDesc(job, flags)``,
  ``backupEnd(job, flags)``, and the universal ``jobBegin(xml, flags)``.

An integer id is derived from the job's UUID (its top 31 bits), so every client of the
same jobd sees the same id for the same job.
"""

from __future__ import annotations

import uuid as _uuid
from typing import Any

from lxml import etree

from jobcore import facade
from jobcore.errors import JobError
from jobcore.libvirt import constants as C
from jobcore.libvirt.errors import libvirtError, make_error
from jobcore.libvirt.objects import _api, libvirt_stats, virConnect, virDomain
from jobcore.spec import JobType
from jobcore.types.backup import BackupJobSpec
from jobcore.xml import format_backup, parse_backup, parse_checkpoint, parse_job

#: jobStats' key of the job id (Blake)
VIR_DOMAIN_JOB_ID = "id"
#: backupEnd: abort a push backup that has not copied everything yet (Blake)
VIR_DOMAIN_BACKUP_END_ABORT = 1 << 0
#: the UUID that names the domain job (jobcore's legacy alias; Berrangé)
VIR_DOMAIN_JOB_LEGACY_UUID = str(C.LEGACY_DOMAIN_JOB_UUID)

# virDomainJob's type() (Berrangé: each job object says what it is)
VIR_DOMAIN_JOB_OBJECT_TYPE_UNKNOWN = 0
VIR_DOMAIN_JOB_OBJECT_TYPE_BACKUP = 1
VIR_DOMAIN_JOB_OBJECT_TYPE_BLOCKPULL = 2
VIR_DOMAIN_JOB_OBJECT_TYPE_BLOCKCOMMIT = 3
VIR_DOMAIN_JOB_OBJECT_TYPE_MIGRATION = 4

_OBJECT_TYPES = {
    JobType.BACKUP: VIR_DOMAIN_JOB_OBJECT_TYPE_BACKUP,
    JobType.BLOCKPULL: VIR_DOMAIN_JOB_OBJECT_TYPE_BLOCKPULL,
    JobType.BLOCKCOMMIT: VIR_DOMAIN_JOB_OBJECT_TYPE_BLOCKCOMMIT,
    JobType.MIGRATION: VIR_DOMAIN_JOB_OBJECT_TYPE_MIGRATION,
}


def job_id(job_uuid: _uuid.UUID) -> int:
    """The positive integer id of a job (its UUID's top 31 bits, never 0)."""
    return (job_uuid.int >> 97) or 1


def _begin_backup(
    dom: virDomain, backup_xml: str | None, checkpoint_xml: str | None, flags: int
) -> facade.BlockingJob:
    """Begin a backup as virDomainBackupBegin does, keeping the job handle."""
    backup = parse_backup(backup_xml or "<domainbackup/>")
    checkpoint = None if checkpoint_xml is None else parse_checkpoint(checkpoint_xml)
    bconn = dom._conn._bconn
    job = bconn.run(dom._b.adom.job_begin_spec, BackupJobSpec(backup, checkpoint), flags)
    return facade.BlockingJob(bconn, job)


def _backup_xml(job: facade.BlockingJob, ident: int | None) -> str:
    """The job's effective ``<domainbackup>``, with ``id='N'`` when ``ident`` is given."""
    spec = parse_job(facade.JobGetXMLDesc(job))
    if not isinstance(spec, BackupJobSpec):
        raise make_error(C.VIR_ERR_NO_DOMAIN_BACKUP, f"job '{job.uuid}' is not a backup")
    text = format_backup(spec.backup)
    if ident is None:
        return text
    root = etree.fromstring(text.encode())
    root.set("id", str(ident))
    return etree.tostring(root, encoding="unicode")


def _end_backup(job: facade.BlockingJob, flags: int) -> int:
    """Blake's virDomainBackupEnd: 1 if the backup completed (a pull ends normally; a push
    only once it copied everything), 0 if it was aborted (ABORT flag); an unfinished push
    without the flag is refused."""
    if flags & ~VIR_DOMAIN_BACKUP_END_ABORT:
        raise make_error(
            C.VIR_ERR_INVALID_ARG, f"unsupported flags ({flags:#x}) in function virDomainBackupEnd"
        )
    info = facade.JobGetInfo(job)
    if info.state.active:
        pull = parse_job(facade.JobGetXMLDesc(job))
        assert isinstance(pull, BackupJobSpec)
        if pull.backup.effective_mode.value != "pull" and not flags & VIR_DOMAIN_BACKUP_END_ABORT:
            raise make_error(
                C.VIR_ERR_OPERATION_INVALID,
                f"backup job {job_id(job.uuid)} has not copied everything yet: pass "
                "VIR_DOMAIN_BACKUP_END_ABORT to abort it",
            )
        facade.JobAbort(job)
        info = facade.JobWait(job)
    if str(info.state) == "completed":
        return 1
    if str(info.state) == "cancelled":
        return 0
    raise make_error(C.VIR_ERR_OPERATION_FAILED, f"backup job failed: {info.errmsg}")


def _legacy(dom: virDomain) -> facade.BlockingJob | None:
    try:
        return facade.JobLookupByUUID(dom._b, C.LEGACY_DOMAIN_JOB_UUID)
    except JobError:
        return None


# ---- Eric Blake's integer ids -----------------------------------------------------------


class BlakeDomain:
    """A domain as Eric Blake's v7/v8 backup API sees it: jobs named by integer ids."""

    def __init__(self, dom: virDomain) -> None:
        self.dom = dom

    @property
    def _vconn(self) -> virConnect:
        return self.dom._conn

    def _backup(self, ident: int) -> facade.BlockingJob:
        if ident < 0:
            raise make_error(C.VIR_ERR_INVALID_ARG, f"invalid backup job id {ident}")
        if ident == 0:
            job = _legacy(self.dom)  # the running one, else the last ended: not "current"
            if (
                job is not None
                and job.type == JobType.BACKUP
                and facade.JobGetInfo(job).state.active
            ):
                return job
            raise make_error(C.VIR_ERR_NO_DOMAIN_BACKUP, "no domain backup job present")
        for job in self.dom._b.listJobs():
            if job.type == JobType.BACKUP and job_id(job.uuid) == ident:
                return job
        raise make_error(C.VIR_ERR_NO_DOMAIN_BACKUP, f"no domain backup job with id {ident}")

    @_api("virDomainBackupBegin", writes=True)
    def backupBegin(
        self, backupXML: str | None, checkpointXML: str | None = None, flags: int = 0
    ) -> int:
        """Begin a backup; its positive job id."""
        return job_id(_begin_backup(self.dom, backupXML, checkpointXML, flags).uuid)

    @_api("virDomainBackupGetXMLDesc")
    def backupGetXMLDesc(self, id: int = 0, flags: int = 0) -> str:
        """The backup job's XML with its ``id``; id 0: the current backup job."""
        job = self._backup(id)
        return _backup_xml(job, job_id(job.uuid))

    @_api("virDomainBackupEnd", writes=True)
    def backupEnd(self, id: int = 0, flags: int = 0) -> int:
        """End backup ``id`` (0: the current one): 1 completed, 0 aborted."""
        return _end_backup(self._backup(id), flags)

    @_api("virDomainGetJobStats")
    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        """virDomainGetJobStats, with ``id`` of the job it describes."""
        stats = libvirt_stats(self.dom._b.jobStats(flags))
        if stats.get("type") != C.VIR_DOMAIN_JOB_NONE:
            job = _legacy(self.dom)
            if job is not None:
                stats[VIR_DOMAIN_JOB_ID] = job_id(job.uuid)
        return stats


# ---- Daniel Berrangé's job objects --------------------------------------------------------


class virDomainJob:
    """A job object: any job of a domain, named by its UUID."""

    def __init__(self, dom: virDomain, job: facade.BlockingJob) -> None:
        self._dom = dom
        self._job = job

    @property
    def _vconn(self) -> virConnect:
        return self._dom._conn

    def __repr__(self) -> str:
        return f"<virDomainJob {self._job.uuid} {self._job.type}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, virDomainJob) and other._job == self._job

    def __hash__(self) -> int:
        return hash(self._job)

    def _live(self) -> facade.BlockingJob:
        if self._job.freed:
            raise make_error(C.VIR_ERR_INVALID_ARG, "invalid domain job pointer (freed)")
        return self._job

    def domain(self) -> virDomain:
        return self._dom

    def UUID(self) -> bytes:
        return self._live().uuid.bytes

    def UUIDString(self) -> str:
        return str(self._live().uuid)

    def type(self) -> int:
        return _OBJECT_TYPES.get(self._live().type, VIR_DOMAIN_JOB_OBJECT_TYPE_UNKNOWN)

    @_api("virDomainJobGetXMLDesc")
    def XMLDesc(self, flags: int = 0) -> str:
        return facade.JobGetXMLDesc(self._live(), flags)

    @_api("virDomainJobAbort", writes=True)
    def abort(self, flags: int = 0) -> int:
        return facade.JobAbort(self._live(), flags)

    @_api("virDomainJobGetStats")
    def stats(self, flags: int = 0) -> dict[str, Any]:
        """libvirt's typed parameters of this job (virDomainGetJobStats' keys)."""
        return libvirt_stats(facade.JobGetStats(self._live(), flags))

    @_api("virDomainJobGetInfo")
    def info(self) -> list[int]:
        """virDomainJobInfo's 12 numbers for this job (type, elapsed ms, remaining ms,
        data total/processed/remaining, memory…, file…)."""
        st = self.stats()
        mem = [int(st.get(f"memory_{k}", 0)) for k in ("total", "processed", "remaining")]
        disk = [int(st.get(f"disk_{k}", 0)) for k in ("total", "processed", "remaining")]
        data = [m + d for m, d in zip(mem, disk, strict=True)]
        return [int(st["type"]), int(st["time_elapsed"]), 0, *data, *mem, *disk]

    def free(self) -> int:
        return facade.JobFree(self._job)


class BerrangeDomain:
    """A domain as Daniel Berrangé's proposal sees it: jobs are objects."""

    def __init__(self, dom: virDomain) -> None:
        self.dom = dom

    @property
    def _vconn(self) -> virConnect:
        return self.dom._conn

    def _wrap(self, job: facade.BlockingJob) -> virDomainJob:
        return virDomainJob(self.dom, job)

    @_api("virDomainJobLookupByUUIDString")
    def jobLookupByUUIDString(self, uuidstr: str) -> virDomainJob:
        """A job of this domain; the legacy alias UUID names the domain job."""
        return self._wrap(facade.JobLookupByUUID(self.dom._b, uuidstr))

    @_api("virDomainJobLookupByUUID")
    def jobLookupByUUID(self, uuid: bytes) -> virDomainJob:
        return self._wrap(facade.JobLookupByUUID(self.dom._b, bytes(uuid)))

    @_api("virDomainListAllJobs")
    def listAllJobs(self, flags: int = 0) -> list[virDomainJob]:
        return [self._wrap(j) for j in self.dom._b.listJobs()]

    @_api("virDomainJobBegin", writes=True)
    def jobBegin(self, xml: str, flags: int = 0) -> virDomainJob:
        """The universal entry point: a ``<job type='…'>`` document."""
        return self._wrap(facade.JobBegin(self.dom._b, xml, flags))

    @_api("virDomainBackupBegin", writes=True)
    def backupBegin(
        self, backupXML: str | None, checkpointXML: str | None = None, flags: int = 0
    ) -> virDomainJob:
        return self._wrap(_begin_backup(self.dom, backupXML, checkpointXML, flags))

    @_api("virDomainBackupGetXMLDesc")
    def backupGetXMLDesc(self, job: virDomainJob, flags: int = 0) -> str:
        if flags:
            raise make_error(
                C.VIR_ERR_INVALID_ARG,
                f"unsupported flags ({flags:#x}) in function virDomainBackupGetXMLDesc",
            )
        return _backup_xml(job._live(), None)

    @_api("virDomainBackupEnd", writes=True)
    def backupEnd(self, job: virDomainJob, flags: int = 0) -> int:
        return _end_backup(job._live(), flags)


__all__ = [
    "VIR_DOMAIN_BACKUP_END_ABORT",
    "VIR_DOMAIN_JOB_ID",
    "VIR_DOMAIN_JOB_LEGACY_UUID",
    "VIR_DOMAIN_JOB_OBJECT_TYPE_BACKUP",
    "VIR_DOMAIN_JOB_OBJECT_TYPE_BLOCKCOMMIT",
    "VIR_DOMAIN_JOB_OBJECT_TYPE_BLOCKPULL",
    "VIR_DOMAIN_JOB_OBJECT_TYPE_MIGRATION",
    "VIR_DOMAIN_JOB_OBJECT_TYPE_UNKNOWN",
    "BerrangeDomain",
    "BlakeDomain",
    "job_id",
    "libvirtError",
    "virDomainJob",
]
