"""jobcore: every long-running domain operation is a job object with a UUID.

Async API: ``async with jobcore.connect(uri) as conn``; blocking, libvirt-flavoured
facade: ``jobcore.open(uri)`` and the ``Job*`` functions. See README.md and design/.
"""

from jobcore.api import LEGACY_DOMAIN_JOB_UUID, Connection, Domain, Job, connect
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
    NoSuchDomain,
    NoSuchJob,
    OperationInvalid,
    QueueTimeout,
    StoreError,
    SubscriptionOverflow,
    Unsupported,
    XMLError,
)
from jobcore.events import EventFilter, EventKind, JobEvent, Subscription
from jobcore.facade import (
    BlockingConnection,
    BlockingDomain,
    BlockingJob,
    JobAbort,
    JobBegin,
    JobComplete,
    JobFree,
    JobGetInfo,
    JobGetStats,
    JobGetType,
    JobGetUUID,
    JobGetUUIDString,
    JobGetXMLDesc,
    JobLookupByUUID,
    JobPause,
    JobResume,
    JobSetSpeed,
    JobWait,
    open,
)
from jobcore.info import JobInfo
from jobcore.lifecycle import JobState, Verb
from jobcore.spec import ChainRef, JobOptions, JobType
from jobcore.types.backup import BackupJobSpec
from jobcore.types.chain import BlockCommitSpec, BlockPullSpec
from jobcore.types.migration import MigrationSpec

__all__ = [
    "LEGACY_DOMAIN_JOB_UUID",
    "AccessDenied",
    "BackupJobSpec",
    "BlockCommitSpec",
    "BlockPullSpec",
    "BlockingConnection",
    "BlockingDomain",
    "BlockingJob",
    "ChainRef",
    "Connection",
    "ConnectionLost",
    "DaemonUnreachable",
    "Domain",
    "DriverError",
    "EventFilter",
    "EventKind",
    "InvalidArgument",
    "InvalidURI",
    "Job",
    "JobAbort",
    "JobBegin",
    "JobComplete",
    "JobConflict",
    "JobError",
    "JobEvent",
    "JobFree",
    "JobGetInfo",
    "JobGetStats",
    "JobGetType",
    "JobGetUUID",
    "JobGetUUIDString",
    "JobGetXMLDesc",
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
