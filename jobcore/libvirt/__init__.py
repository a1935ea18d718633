"""jobcore.libvirt: the libvirt-python surface that job-using programs touch, on jobcore.

libvirt's names, signatures, return shapes, constants and error codes: the module
functions (``open``, ``openReadOnly``, ``openAuth``, ``registerErrorHandler``,
``getVersion``, the default event loop), ``virConnect``, ``virDomain``,
``virDomainCheckpoint`` and ``libvirtError``; ``jobcore.libvirt.qemu`` is
``libvirt_qemu``. ``python -m jobcore.libvirt --path`` prints the directory whose
``libvirt.py`` and ``libvirt_qemu.py`` are these modules under libvirt's names, and
``jobctl run -- CMD`` runs a program with it first on its import path
(design/libvirt.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jobcore.libvirt import constants
from jobcore.libvirt.constants import *  # noqa: F403
from jobcore.libvirt.errors import (
    libvirtError,
    make_error,
    registerErrorHandler,
    virGetLastError,
    virGetLastErrorCode,
    virGetLastErrorDomain,
    virGetLastErrorMessage,
    virResetLastError,
)
from jobcore.libvirt.eventloop import (
    virEventAddHandle,
    virEventAddTimeout,
    virEventRegisterDefaultImpl,
    virEventRemoveHandle,
    virEventRemoveTimeout,
    virEventRunDefaultImpl,
    virEventUpdateHandle,
    virEventUpdateTimeout,
)
from jobcore.libvirt.objects import (
    InProcessDomainWarning,
    resolve_uri,
    virConnect,
    virDomain,
    virDomainCheckpoint,
)
from jobcore.libvirt.shimdir import shim_dir


def open(name: str | None = None) -> virConnect:
    """Open a connection (``None``: ``qemu:///session``); ``qemu:///…`` and ``sim:///…``
    reach the default run directory's jobd when one runs, else run in-process."""
    return virConnect(name)


def openReadOnly(name: str | None = None) -> virConnect:
    """A read-only connection (jobd's read-only socket; every write call is refused)."""
    return virConnect(name, readonly=True)


def openAuth(name: str | None, auth: Sequence[Any], flags: int = 0) -> virConnect:
    """``open`` with libvirt's credential list ``[[types…], callback, opaque]``: jobcore's
    connections (local, or jobd's UNIX socket) ask for no credential, so the callback is
    never called. ``flags``: VIR_CONNECT_RO."""
    if flags & ~(constants.VIR_CONNECT_RO | constants.VIR_CONNECT_NO_ALIASES):
        raise make_error(
            constants.VIR_ERR_INVALID_ARG,
            f"unsupported flags ({flags:#x}) in function virConnectOpenAuth",
        )
    return virConnect(name, readonly=bool(flags & constants.VIR_CONNECT_RO))


def getVersion(name: str | None = None) -> int:
    """The libvirt version jobcore.libvirt implements (9.0.0: 9000000)."""
    return constants.LIB_VERSION


def virInitialize() -> int:
    return 0


__all__ = [
    *(n for n in dir(constants) if n.startswith(("VIR_", "VIR_WAR_"))),
    "InProcessDomainWarning",
    "getVersion",
    "libvirtError",
    "open",
    "openAuth",
    "openReadOnly",
    "registerErrorHandler",
    "resolve_uri",
    "shim_dir",
    "virConnect",
    "virDomain",
    "virDomainCheckpoint",
    "virEventAddHandle",
    "virEventAddTimeout",
    "virEventRegisterDefaultImpl",
    "virEventRemoveHandle",
    "virEventRemoveTimeout",
    "virEventRunDefaultImpl",
    "virEventUpdateHandle",
    "virEventUpdateTimeout",
    "virGetLastError",
    "virGetLastErrorCode",
    "virGetLastErrorDomain",
    "virGetLastErrorMessage",
    "virInitialize",
    "virResetLastError",
]

_unused: Callable[..., object] = make_error  # used by openAuth; re-exported for tools
