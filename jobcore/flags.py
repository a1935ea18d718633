"""Which flag bits each public call accepts, and the one check that enforces it.

As libvirt's ``virCheckFlags``: a call given a bit it does not know refuses it with
``InvalidArgument`` ("unsupported flags (0x…) in function …") instead of ignoring it, so a
caller never believes a flag took effect when it did not. ``FLAG_NAMES`` is the table: one
row per call, keyed by the blocking facade's name (libvirt-python's spelling), naming the
constants (jobcore.constants) it accepts; ``ACCEPTED_FLAGS`` is the same as masks.
``JOB_BEGIN_TYPE_FLAGS`` adds the bits ``JobBegin`` accepts for one job type only. The async
API checks (so jobd, which serves every remote call through it, checks too), the remote
client checks before a mask goes on the wire, and the blocking facade checks the calls
whose async counterpart takes no flags. design/tables.md draws the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from jobcore import constants as C
from jobcore.errors import InvalidArgument

#: Flags are unsigned bit masks of at most 64 bits (libvirt's are 32).
FLAGS_LIMIT = 1 << 64

#: call -> the names of the flags it accepts. A call takes no other bit.
FLAG_NAMES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # the universal job API (JobBegin: plus JOB_BEGIN_TYPE_FLAGS of the job's type)
        "JobBegin": ("JOB_BEGIN_QUEUE",),
        "JobGroupBegin": ("JOB_BEGIN_QUEUE",),
        "JobGetXMLDesc": (),
        "JobGetStats": (),
        "JobAbort": (),
        "JobPause": (),
        "JobResume": (),
        "JobComplete": (),
        "JobSetSpeed": (),
        # legacy virDomain calls
        "jobStats": ("VIR_DOMAIN_JOB_STATS_COMPLETED", "VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED"),
        "backupBegin": ("VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL",),
        "backupGetXMLDesc": (),
        "blockJobInfo": ("VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES",),
        "blockJobAbort": ("VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC", "VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT"),
        "blockPull": ("VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES",),
        # VIR_DOMAIN_BLOCK_COMMIT_RELATIVE is not implemented (no backing-file string is
        # rewritten), so it is refused rather than ignored
        "blockCommit": (
            "VIR_DOMAIN_BLOCK_COMMIT_SHALLOW",
            "VIR_DOMAIN_BLOCK_COMMIT_DELETE",
            "VIR_DOMAIN_BLOCK_COMMIT_ACTIVE",
            "VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES",
        ),
        # checkpoints (virDomainCheckpoint*; QUIESCE is accepted and refused with its own
        # message: there is no guest agent)
        "checkpointCreateXML": (
            "VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE",
            "VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE",
            "VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE",
        ),
        "listAllCheckpoints": (
            "VIR_DOMAIN_CHECKPOINT_LIST_ROOTS",
            "VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL",
            "VIR_DOMAIN_CHECKPOINT_LIST_LEAVES",
            "VIR_DOMAIN_CHECKPOINT_LIST_NO_LEAVES",
        ),
        "checkpointLookupByName": (),
        "checkpointGetXMLDesc": (
            "VIR_DOMAIN_CHECKPOINT_XML_SECURE",
            "VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN",
            "VIR_DOMAIN_CHECKPOINT_XML_SIZE",
        ),
        "checkpointGetParent": (),
        "checkpointDelete": (
            "VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN",
            "VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY",
            "VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY",
        ),
        # domain description and the QEMU monitor (design/xml.md "Domain XML"): SECURE
        # and INACTIVE accepted (jobcore keeps no secrets; INACTIVE drops the live
        # backing chains); UPDATE_CPU and MIGRATABLE refused, there being no <cpu>
        "XMLDesc": ("VIR_DOMAIN_XML_SECURE", "VIR_DOMAIN_XML_INACTIVE"),
        "qemuMonitorCommand": ("VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP",),
        # virConnect calls: no filter or creation flag is implemented
        "listAllDomains": (),
        "createXML": (),
        # the fleet (jobd on PostgreSQL): fencing a LIVE host takes FORCE
        "fenceHost": ("JOB_FENCE_FORCE",),
    }
)

#: job type -> the names of the extra flags JobBegin accepts for it (others refuse them).
JOB_BEGIN_TYPE_FLAG_NAMES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"backup": ("VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL",)}
)


def _mask(names: tuple[str, ...]) -> int:
    mask = 0
    for name in names:
        mask |= int(getattr(C, name))
    return mask


ACCEPTED_FLAGS: Mapping[str, int] = MappingProxyType(
    {call: _mask(names) for call, names in FLAG_NAMES.items()}
)
JOB_BEGIN_TYPE_FLAGS: Mapping[str, int] = MappingProxyType(
    {t: _mask(names) for t, names in JOB_BEGIN_TYPE_FLAG_NAMES.items()}
)


def accepted(call: str, job_type: str | None = None) -> int:
    """The bits ``call`` accepts. For JobBegin: those of a ``job_type`` job, or without
    a type those of any type (what a client can check before the XML is parsed)."""
    mask = ACCEPTED_FLAGS[call]
    if call == "JobBegin":
        if job_type is None:
            for extra in JOB_BEGIN_TYPE_FLAGS.values():
                mask |= extra
        else:
            mask |= JOB_BEGIN_TYPE_FLAGS.get(str(job_type), 0)
    return mask


def check_flags(call: str, flags: object, *, job_type: str | None = None) -> int:
    """``flags`` when every bit is one ``call`` accepts; else InvalidArgument naming the
    bits it does not (and a negative or wider-than-64-bit value is refused as such)."""
    mask = accepted(call, job_type)
    if not isinstance(flags, int):
        raise InvalidArgument(
            f"flags of {call} must be an integer bit mask, not {type(flags).__name__}"
        )
    if flags < 0 or flags >= FLAGS_LIMIT:
        raise InvalidArgument(
            f"invalid flags ({flags}) in function {call}: flags are an unsigned 64-bit mask"
            f" (accepted bits: {mask:#x})"
        )
    unknown = flags & ~mask
    if unknown:
        what = f" for a '{job_type}' job" if job_type is not None else ""
        raise InvalidArgument(
            f"unsupported flags ({unknown:#x}) in function {call}{what} (accepted bits: {mask:#x})"
        )
    return flags
