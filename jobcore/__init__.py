"""jobcore: every long-running domain operation is a job object with a UUID.

Async API: ``async with jobcore.connect(uri) as conn``; blocking, libvirt-flavoured
facade: ``jobcore.open(uri)`` and the ``Job*`` functions. See README.md and design/.
"""

import importlib as _importlib

from jobcore.constants import *  # noqa: F403  (libvirt's names and values)
from jobcore.errors import (
    AccessDenied,
    ConnectionLost,
    DaemonUnreachable,
    DriverError,
    InvalidArgument,
    InvalidURI,
    JobConflict,
    JobError,
    NoSuchCheckpoint,
    NoSuchDomain,
    NoSuchJob,
    OperationInvalid,
    QueueTimeout,
    StoreError,
    SubscriptionOverflow,
    Unsupported,
    XMLError,
)

TYPE_CHECKING = False  # typing itself is not loaded for this (jobctl's fast start)
if TYPE_CHECKING:
    import typing as _typing

    from jobcore.api import Checkpoint, Connection, Domain, Job, connect
    from jobcore.constants import LEGACY_DOMAIN_JOB_UUID
    from jobcore.events import EventFilter, EventKind, JobEvent, Subscription
    from jobcore.facade import (  # groups
        BlockingCheckpoint,
        BlockingConnection,
        BlockingDomain,
        BlockingJob,
        JobAbort,
        JobBegin,
        JobComplete,
        JobExplain,
        JobFree,
        JobGetInfo,
        JobGetStats,
        JobGetType,
        JobGetUUID,
        JobGetUUIDString,
        JobGetXMLDesc,
        JobGroupAbort,
        JobGroupBegin,
        JobGroupExplain,
        JobGroupGetInfo,
        JobGroupGetJobs,
        JobGroupWait,
        JobLookupByUUID,
        JobPause,
        JobResume,
        JobSetSpeed,
        JobWait,
        open,
    )
    from jobcore.info import Explanation, GroupInfo, HostInfo, HostState, JobInfo
    from jobcore.lifecycle import JobState, Verb
    from jobcore.spec import ChainRef, JobOptions, JobType
    from jobcore.types.backup import BackupJobSpec
    from jobcore.types.chain import BlockCommitSpec, BlockPullSpec
    from jobcore.types.migration import MigrationSpec
del TYPE_CHECKING

#: the public names that live in heavier modules, imported on first use: ``jobctl
#: --version`` and a jobd client never load the engine, a driver or the blocking facade
_LAZY = {
    "LEGACY_DOMAIN_JOB_UUID": "jobcore.constants",  # uuid: on first use
    "BackupJobSpec": "jobcore.types.backup",
    "BlockCommitSpec": "jobcore.types.chain",
    "BlockPullSpec": "jobcore.types.chain",
    "BlockingCheckpoint": "jobcore.facade",
    "BlockingConnection": "jobcore.facade",
    "BlockingDomain": "jobcore.facade",
    "BlockingJob": "jobcore.facade",
    "ChainRef": "jobcore.spec",
    "Checkpoint": "jobcore.api",
    "Connection": "jobcore.api",
    "Domain": "jobcore.api",
    "EventFilter": "jobcore.events",
    "EventKind": "jobcore.events",
    "Explanation": "jobcore.info",
    "HostInfo": "jobcore.info",
    "HostState": "jobcore.info",
    "Job": "jobcore.api",
    "JobAbort": "jobcore.facade",
    "JobBegin": "jobcore.facade",
    "JobComplete": "jobcore.facade",
    "JobEvent": "jobcore.events",
    "JobExplain": "jobcore.facade",
    "JobFree": "jobcore.facade",
    "JobGetInfo": "jobcore.facade",
    "JobGetStats": "jobcore.facade",
    "JobGetType": "jobcore.facade",
    "JobGetUUID": "jobcore.facade",
    "JobGetUUIDString": "jobcore.facade",
    "JobGetXMLDesc": "jobcore.facade",
    "JobInfo": "jobcore.info",
    "JobLookupByUUID": "jobcore.facade",
    "JobOptions": "jobcore.spec",
    "JobPause": "jobcore.facade",
    "JobResume": "jobcore.facade",
    "JobSetSpeed": "jobcore.facade",
    "JobState": "jobcore.lifecycle",
    "JobType": "jobcore.spec",
    "JobWait": "jobcore.facade",
    # groups
    "JobGroupAbort": "jobcore.facade",
    "JobGroupBegin": "jobcore.facade",
    "JobGroupExplain": "jobcore.facade",
    "JobGroupGetInfo": "jobcore.facade",
    "JobGroupGetJobs": "jobcore.facade",
    "JobGroupWait": "jobcore.facade",
    "GroupInfo": "jobcore.info",
    "MigrationSpec": "jobcore.types.migration",
    "Subscription": "jobcore.events",
    "Verb": "jobcore.lifecycle",
    "connect": "jobcore.api",
    "open": "jobcore.facade",
}


def __getattr__(name: str) -> "_typing.Any":
    module = _LAZY.get(name)
    if module is None:  # a submodule not imported yet (``jobcore.local``) is found too
        try:
            return _importlib.import_module(f"jobcore.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"jobcore.{name}":
                raise
        raise AttributeError(f"module 'jobcore' has no attribute '{name}'")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*(n for n in globals() if not n.startswith("_")), *_LAZY})


__all__ = [
    "LEGACY_DOMAIN_JOB_UUID",
    "AccessDenied",
    "BackupJobSpec",
    "BlockCommitSpec",
    "BlockPullSpec",
    "BlockingCheckpoint",
    "BlockingConnection",
    "BlockingDomain",
    "BlockingJob",
    "ChainRef",
    "Checkpoint",
    "Connection",
    "ConnectionLost",
    "DaemonUnreachable",
    "Domain",
    "DriverError",
    "EventFilter",
    "EventKind",
    "Explanation",
    "GroupInfo",
    "HostInfo",
    "HostState",
    "InvalidArgument",
    "InvalidURI",
    "Job",
    "JobAbort",
    "JobBegin",
    "JobComplete",
    "JobConflict",
    "JobError",
    "JobEvent",
    "JobExplain",
    "JobFree",
    "JobGetInfo",
    "JobGetStats",
    "JobGetType",
    "JobGetUUID",
    "JobGetUUIDString",
    "JobGetXMLDesc",
    "JobGroupAbort",
    "JobGroupBegin",
    "JobGroupExplain",
    "JobGroupGetInfo",
    "JobGroupGetJobs",
    "JobGroupWait",
    "JobInfo",
    "JobLookupByUUID",
    "JobOptions",
    "JobPause",
    "JobResume",
    "JobSetSpeed",
    "JobState",
    "JobType",
    "JobWait",
    "MigrationSpec",
    "NoSuchCheckpoint",
    "NoSuchDomain",
    "NoSuchJob",
    "OperationInvalid",
    "QueueTimeout",
    "StoreError",
    "Subscription",
    "SubscriptionOverflow",
    "Unsupported",
    "Verb",
    "XMLError",
    "connect",
    "open",
]
