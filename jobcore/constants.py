"""libvirt's constants, same names and values as libvirt-python, where jobcore uses them."""

from __future__ import annotations

TYPE_CHECKING = False  # neither typing nor uuid is loaded for this: see the end
if TYPE_CHECKING:
    import uuid as _uuid

# virDomainJobType
VIR_DOMAIN_JOB_NONE = 0
VIR_DOMAIN_JOB_BOUNDED = 1
VIR_DOMAIN_JOB_UNBOUNDED = 2
VIR_DOMAIN_JOB_COMPLETED = 3
VIR_DOMAIN_JOB_FAILED = 4
VIR_DOMAIN_JOB_CANCELLED = 5

# virDomainGetJobStatsFlags
VIR_DOMAIN_JOB_STATS_COMPLETED = 1 << 0
VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED = 1 << 1

# virDomainJobOperation
VIR_DOMAIN_JOB_OPERATION_UNKNOWN = 0
VIR_DOMAIN_JOB_OPERATION_START = 1
VIR_DOMAIN_JOB_OPERATION_SAVE = 2
VIR_DOMAIN_JOB_OPERATION_RESTORE = 3
VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN = 4
VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT = 5
VIR_DOMAIN_JOB_OPERATION_SNAPSHOT = 6
VIR_DOMAIN_JOB_OPERATION_SNAPSHOT_REVERT = 7
VIR_DOMAIN_JOB_OPERATION_DUMP = 8
VIR_DOMAIN_JOB_OPERATION_BACKUP = 9
VIR_DOMAIN_JOB_OPERATION_SNAPSHOT_DELETE = 10

# virDomainBlockJobType
VIR_DOMAIN_BLOCK_JOB_TYPE_UNKNOWN = 0
VIR_DOMAIN_BLOCK_JOB_TYPE_PULL = 1
VIR_DOMAIN_BLOCK_JOB_TYPE_COPY = 2
VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT = 3
VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT = 4
VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP = 5

# virDomainBlockJobAbortFlags
VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC = 1 << 0
VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT = 1 << 1

# virDomainBlockJobInfoFlags
VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES = 1 << 0

# virDomainBlockPullFlags
VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES = 1 << 6

# virDomainBlockCommitFlags
VIR_DOMAIN_BLOCK_COMMIT_SHALLOW = 1 << 0
VIR_DOMAIN_BLOCK_COMMIT_DELETE = 1 << 1
VIR_DOMAIN_BLOCK_COMMIT_ACTIVE = 1 << 2
VIR_DOMAIN_BLOCK_COMMIT_RELATIVE = 1 << 3
VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES = 1 << 4

# virConnectDomainEventBlockJobStatus
VIR_DOMAIN_BLOCK_JOB_COMPLETED = 0
VIR_DOMAIN_BLOCK_JOB_FAILED = 1
VIR_DOMAIN_BLOCK_JOB_CANCELED = 2
VIR_DOMAIN_BLOCK_JOB_READY = 3

# virDomainBackupBeginFlags
VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL = 1 << 0

# virDomainCheckpointCreateFlags (libvirt-domain-checkpoint.h)
VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE = 1 << 0
VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE = 1 << 1
VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE = 1 << 2

# virDomainCheckpointXMLFlags
VIR_DOMAIN_CHECKPOINT_XML_SECURE = 1 << 0
VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN = 1 << 1
VIR_DOMAIN_CHECKPOINT_XML_SIZE = 1 << 2

# virDomainCheckpointListFlags (ROOTS for a domain's list, DESCENDANTS for a checkpoint's)
VIR_DOMAIN_CHECKPOINT_LIST_ROOTS = 1 << 0
VIR_DOMAIN_CHECKPOINT_LIST_DESCENDANTS = 1 << 0
VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL = 1 << 1
VIR_DOMAIN_CHECKPOINT_LIST_LEAVES = 1 << 2
VIR_DOMAIN_CHECKPOINT_LIST_NO_LEAVES = 1 << 3

# virDomainCheckpointDeleteFlags
VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN = 1 << 0
VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY = 1 << 1
VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY = 1 << 2

# virDomainEventID
VIR_DOMAIN_EVENT_ID_BLOCK_JOB = 8
VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2 = 16
VIR_DOMAIN_EVENT_ID_JOB_COMPLETED = 21

# virDomainXMLFlags (virDomainGetXMLDesc)
VIR_DOMAIN_XML_SECURE = 1 << 0
VIR_DOMAIN_XML_INACTIVE = 1 << 1
VIR_DOMAIN_XML_UPDATE_CPU = 1 << 2
VIR_DOMAIN_XML_MIGRATABLE = 1 << 3

# virDomainQemuMonitorCommandFlags (libvirt-qemu)
VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT = 0
VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP = 1 << 0

# jobcore's own JobBegin flags (no libvirt counterpart). They live from bit 16 up, out of
# the space of libvirt's per-call flags, because JobBegin also takes those (a backup job
# takes VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL = 1 << 0); see jobcore.flags.
JOB_BEGIN_QUEUE = 1 << 16  # wait in a FIFO queue instead of failing with JobConflict

# fenceHost's flags (a fleet call: no libvirt counterpart, no per-call space to share)
JOB_FENCE_FORCE = 1 << 0  # fence a host whose lease is still LIVE

#: The reserved UUID of "the domain job" (design/legacy.md), fixed forever:
#: uuid5(NAMESPACE_URL, 'jobcore:legacy-domain-job'). No job is ever given it. Made on
#: first use: importing uuid (platform, re) would cost jobctl's fast start a few ms.
if TYPE_CHECKING:
    LEGACY_DOMAIN_JOB_UUID: _uuid.UUID
else:

    def __getattr__(name: str) -> object:
        if name != "LEGACY_DOMAIN_JOB_UUID":
            raise AttributeError(f"module 'jobcore.constants' has no attribute '{name}'")
        import uuid

        value = globals()[name] = uuid.UUID("352d1551-dd56-5c91-9f5e-66d1a79be98c")
        return value


del TYPE_CHECKING
