"""Registration of the four built-in job types (loaded lazily by jobcore.registry)."""

from __future__ import annotations

from jobcore import constants as C
from jobcore import scheduler
from jobcore.registry import JobTypeInfo
from jobcore.spec import BackupJobSpec, BlockCommitSpec, BlockPullSpec, JobType, MigrationSpec
from jobcore.xml import codecs


def builtin_type_infos() -> tuple[JobTypeInfo, ...]:
    return (
        JobTypeInfo(JobType.BACKUP, BackupJobSpec, codecs.BACKUP_CODEC,
                    scheduler.backup_claims, domain_level=True,
                    operation=C.VIR_DOMAIN_JOB_OPERATION_BACKUP),
        JobTypeInfo(JobType.BLOCKPULL, BlockPullSpec, codecs.BLOCKPULL_CODEC,
                    scheduler.chain_claims, domain_level=False,
                    operation=C.VIR_DOMAIN_JOB_OPERATION_UNKNOWN),
        JobTypeInfo(JobType.BLOCKCOMMIT, BlockCommitSpec, codecs.BLOCKCOMMIT_CODEC,
                    scheduler.chain_claims, domain_level=False,
                    operation=C.VIR_DOMAIN_JOB_OPERATION_UNKNOWN),
        JobTypeInfo(JobType.MIGRATION, MigrationSpec, codecs.MIGRATION_CODEC,
                    scheduler.migration_claims, domain_level=True,
                    operation=C.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT, progress_keys="data"),
    )
