"""Typed job descriptions: the universal ``<job>`` XML and libvirt's ``<domainbackup>`` and
``<domaincheckpoint>`` formats (design/xml.md).

Every parse function takes ``str`` or ``bytes`` and raises only ``jobcore.errors.XMLError``.
"""

from jobcore.xml.backup import align_backup
from jobcore.xml.job import (
    format_backup,
    format_checkpoint,
    format_job,
    parse_backup,
    parse_checkpoint,
    parse_job,
)

__all__ = [
    "align_backup",
    "format_backup",
    "format_checkpoint",
    "format_job",
    "parse_backup",
    "parse_checkpoint",
    "parse_job",
]
