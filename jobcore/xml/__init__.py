"""Typed job descriptions: the universal ``<job>`` XML and libvirt's ``<domainbackup>`` and
``<domaincheckpoint>`` formats (design/xml.md).

Every parse function takes ``str`` or ``bytes`` and raises only ``jobcore.errors.XMLError``.

Layers: the modules of this package but ``job`` sit below the job types (jobcore.types
use them for their codecs); ``jobcore.xml.job`` sits above the registry. So that importing
a low module never imports the registry, ``parse_job`` and ``format_job`` (contract names)
are re-exported from ``jobcore.xml.job`` when first asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from jobcore.xml.backup import align_backup
from jobcore.xml.documents import format_backup, format_checkpoint, parse_backup, parse_checkpoint

if TYPE_CHECKING:
    from jobcore.xml.job import format_job, parse_job

_FROM_JOB = frozenset({"format_job", "parse_job"})


def __getattr__(name: str) -> Any:
    if name in _FROM_JOB:
        return getattr(importlib.import_module("jobcore.xml.job"), name)
    raise AttributeError(f"module 'jobcore.xml' has no attribute '{name}'")


__all__ = [
    "align_backup",
    "format_backup",
    "format_checkpoint",
    "format_job",
    "parse_backup",
    "parse_checkpoint",
    "parse_job",
]
