"""``libvirtError`` and how every jobcore error crosses into it.

libvirt-python's ``libvirtError`` carries libvirt's ``virError`` as the 9-tuple ``err``:
(code, domain, message, level, str1, str2, str3, int1, int2), where ``message`` is the
code's text with the detail filled in ("Domain not found: no domain with matching name
'vm9'"), ``str1`` that text's format and ``str2`` the detail, as libvirt's
``virReportErrorHelper`` fills them. ``to_libvirt_error`` maps a jobcore error to the code
libvirt reports in the same situation (design/libvirt.md, "Error mapping"); an API can
override the code of an error class (``raising``). Every error raised is also handed to the
error handler (``registerErrorHandler``), else printed to stderr as libvirt's default
handler does, and kept as the thread's last error (``virGetLastError``).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TypeAlias

from jobcore import errors as E
from jobcore.libvirt import constants as C

#: libvirt's virError as libvirt-python hands it out
ErrTuple: TypeAlias = tuple[int, int, str, int, str | None, str | None, str | None, int, int]


class libvirtError(Exception):
    """libvirt-python's exception: ``err`` is the virError tuple, or None. As
    libvirt-python's, one a program makes itself carries the thread's last error."""

    def __init__(
        self,
        defmsg: str,
        conn: object = None,
        dom: object = None,
        net: object = None,
        pool: object = None,
        vol: object = None,
        *,
        err: ErrTuple | None = None,
    ) -> None:
        if err is None:
            err = virGetLastError()
        self.err = err
        super().__init__(err[2] if err is not None else defmsg)

    def get_error_code(self) -> int | None:
        return None if self.err is None else self.err[0]

    def get_error_domain(self) -> int | None:
        return None if self.err is None else self.err[1]

    def get_error_message(self) -> str | None:
        return None if self.err is None else self.err[2]

    def get_error_level(self) -> int | None:
        return None if self.err is None else self.err[3]

    def get_str1(self) -> str | None:
        return None if self.err is None else self.err[4]

    def get_str2(self) -> str | None:
        return None if self.err is None else self.err[5]

    def get_str3(self) -> str | None:
        return None if self.err is None else self.err[6]

    def get_int1(self) -> int | None:
        return None if self.err is None else self.err[7]

    def get_int2(self) -> int | None:
        return None if self.err is None else self.err[8]


#: libvirt's text of each code this module raises (virerror.c's virErrorMsgStrings):
#: the format used when there is a detail
_FORMATS: dict[int, str] = {
    C.VIR_ERR_INTERNAL_ERROR: "internal error: %s",
    C.VIR_ERR_NO_SUPPORT: "this function is not supported by the connection driver: %s",
    C.VIR_ERR_NO_CONNECT: "no connection driver available for %s",
    C.VIR_ERR_INVALID_CONN: "invalid connection pointer in %s",
    C.VIR_ERR_INVALID_ARG: "invalid argument: %s",
    C.VIR_ERR_OPERATION_FAILED: "operation failed: %s",
    C.VIR_ERR_XML_ERROR: "XML error: %s",
    C.VIR_ERR_OPERATION_DENIED: "operation forbidden: %s",
    C.VIR_ERR_SYSTEM_ERROR: "%s",
    C.VIR_ERR_NO_DOMAIN: "Domain not found: %s",
    C.VIR_ERR_NO_STORAGE_POOL: "Storage pool not found: %s",
    C.VIR_ERR_NO_STORAGE_VOL: "Storage volume not found: %s",
    C.VIR_ERR_OPERATION_INVALID: "Requested operation is not valid: %s",
    C.VIR_ERR_CONFIG_UNSUPPORTED: "unsupported configuration: %s",
    C.VIR_ERR_OPERATION_TIMEOUT: "Timed out during operation: %s",
    C.VIR_ERR_ARGUMENT_UNSUPPORTED: "argument unsupported: %s",
    C.VIR_ERR_OPERATION_ABORTED: "operation aborted: %s",
    C.VIR_ERR_OPERATION_UNSUPPORTED: "Operation not supported: %s",
    C.VIR_ERR_AGENT_UNRESPONSIVE: "Guest agent is not responding: %s",
    C.VIR_ERR_RESOURCE_BUSY: "resource busy: %s",
    C.VIR_ERR_ACCESS_DENIED: "access denied: %s",
    C.VIR_ERR_INVALID_DOMAIN_CHECKPOINT: "Invalid domain checkpoint: %s",
    C.VIR_ERR_NO_DOMAIN_CHECKPOINT: "Domain checkpoint not found: %s",
    C.VIR_ERR_NO_DOMAIN_BACKUP: "Domain backup job id not found: %s",
    C.VIR_ERR_CHECKPOINT_INCONSISTENT: "checkpoint inconsistent: %s",
}

#: how libvirt's default error handler names each error domain ("libvirt: X error : …")
_DOMAIN_NAMES: dict[int, str] = {
    C.VIR_FROM_NONE: "",
    C.VIR_FROM_RPC: "RPC",
    C.VIR_FROM_QEMU: "QEMU Driver",
    C.VIR_FROM_TEST: "Test Driver",
    C.VIR_FROM_REMOTE: "Remote",
    C.VIR_FROM_STORAGE: "Storage Driver",
    C.VIR_FROM_DOMAIN: "Domain Config",
    C.VIR_FROM_EVENT: "Events",
    C.VIR_FROM_DOMAIN_CHECKPOINT: "Domain Checkpoint",
}


def make_error(code: int, detail: str, domain: int = C.VIR_FROM_NONE) -> libvirtError:
    """A libvirtError as libvirt reports ``code`` with ``detail`` from ``domain``, handed
    to the error handler and kept as the thread's last error."""
    fmt = _FORMATS.get(code, "%s")
    err: ErrTuple = (code, domain, fmt % detail, C.VIR_ERR_ERROR, fmt, detail, None, -1, -1)
    _report(err)
    return libvirtError(err[2], err=err)


#: jobcore's error classes and libvirt's code for each (first match wins; by name for
#: classes a jobcore without them lacks, such as NoSuchCheckpoint before checkpoints)
_CODES: tuple[tuple[str, int], ...] = (
    ("NoSuchCheckpoint", C.VIR_ERR_NO_DOMAIN_CHECKPOINT),
    ("NoSuchDomain", C.VIR_ERR_NO_DOMAIN),
    ("NoSuchJob", C.VIR_ERR_OPERATION_INVALID),
    ("OperationInvalid", C.VIR_ERR_OPERATION_INVALID),
    ("QueueTimeout", C.VIR_ERR_OPERATION_TIMEOUT),
    ("XMLError", C.VIR_ERR_XML_ERROR),
    ("InvalidURI", C.VIR_ERR_NO_CONNECT),
    ("InvalidArgument", C.VIR_ERR_INVALID_ARG),
    ("AccessDenied", C.VIR_ERR_OPERATION_DENIED),
    ("Unsupported", C.VIR_ERR_OPERATION_UNSUPPORTED),
    ("DaemonUnreachable", C.VIR_ERR_SYSTEM_ERROR),
    ("DriverError", C.VIR_ERR_INTERNAL_ERROR),
    ("StoreError", C.VIR_ERR_INTERNAL_ERROR),
    ("TimeoutError", C.VIR_ERR_OPERATION_TIMEOUT),
)

#: the error domain of codes that are not the driver's own
_DOMAIN_OF: dict[int, int] = {
    C.VIR_ERR_NO_DOMAIN_CHECKPOINT: C.VIR_FROM_DOMAIN_CHECKPOINT,
    C.VIR_ERR_SYSTEM_ERROR: C.VIR_FROM_RPC,
    C.VIR_ERR_NO_CONNECT: C.VIR_FROM_NONE,
}


def _class_names(exc: BaseException) -> list[str]:
    return [cls.__name__ for cls in type(exc).__mro__]


def code_of(exc: BaseException, overrides: dict[str, int] | None = None) -> int:
    """libvirt's code for ``exc`` (``overrides``: class name → code, for one API)."""
    names = _class_names(exc)
    if overrides:
        for name in names:
            if name in overrides:
                return overrides[name]
    for name, code in _CODES:
        if name in names:
            return code
    return C.VIR_ERR_INTERNAL_ERROR


def _conflict(exc: E.JobConflict, api: str) -> tuple[int, str]:
    """What libvirt says where jobcore refuses a conflicting job: a disk already in a block
    job (a block job call), a disk with a block job that a backup wants, or the domain's
    state change lock (libvirt waits 30 s for it, then times out; jobcore says at once)."""
    kind, _, rest = exc.resource.partition(":")
    if kind == "disk":
        disk = rest.rpartition("/")[2]
        if api == "virDomainBackupBegin":
            return C.VIR_ERR_INTERNAL_ERROR, f"disk '{disk}' has a blockjob assigned ({exc})"
        return C.VIR_ERR_OPERATION_UNSUPPORTED, f"disk '{disk}' already in active block job"
    if kind == "domain":
        return (
            C.VIR_ERR_OPERATION_TIMEOUT,
            f"cannot acquire state change lock (held by job {exc.holder})",
        )
    return C.VIR_ERR_OPERATION_INVALID, str(exc)


def to_libvirt_error(
    exc: BaseException,
    api: str,
    driver_domain: int,
    overrides: dict[str, int] | None = None,
) -> libvirtError:
    """``exc`` (anything a jobcore call raised) as the libvirtError libvirt raises there."""
    if isinstance(exc, libvirtError):
        return exc
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, E.JobConflict) and not (overrides and "JobConflict" in overrides):
        code, detail = _conflict(exc, api)
    else:
        code = code_of(exc, overrides)
        if code == C.VIR_ERR_INTERNAL_ERROR and not isinstance(exc, E.JobError):
            detail = f"{type(exc).__name__}: {detail}"
    if code == C.VIR_ERR_NO_SUPPORT:
        detail = api
    return make_error(code, detail, _DOMAIN_OF.get(code, driver_domain))


# ---- the error handler and the last error ------------------------------------------------

ErrorHandler: TypeAlias = Callable[[Any, ErrTuple], object]

_handler_lock = threading.Lock()
_handler: tuple[ErrorHandler, Any] | None = None
_last = threading.local()


def registerErrorHandler(f: ErrorHandler | None, ctx: Any) -> int:
    """Call ``f(ctx, err)`` for every error raised (libvirt-python's signature, keywords
    ``f`` and ``ctx`` included); ``None`` restores libvirt's default (print to stderr)."""
    global _handler
    if f is not None and not callable(f):
        raise TypeError("registerErrorHandler: f must be callable or None")
    with _handler_lock:
        _handler = None if f is None else (f, ctx)
    return 1


def _report(err: ErrTuple) -> None:
    _last.err = err
    with _handler_lock:
        handler = _handler
    if handler is not None:
        handler[0](handler[1], err)
        return
    name = _DOMAIN_NAMES.get(err[1], "")
    sys.stderr.write(f"libvirt: {name} error : {err[2]}\n")


def virGetLastError() -> ErrTuple | None:
    """The last error raised on this thread (None after ``virResetLastError``)."""
    err: ErrTuple | None = getattr(_last, "err", None)
    return err


def virGetLastErrorCode() -> int:
    err = virGetLastError()
    return C.VIR_ERR_OK if err is None else err[0]


def virGetLastErrorDomain() -> int:
    err = virGetLastError()
    return C.VIR_FROM_NONE if err is None else err[1]


def virGetLastErrorMessage() -> str:
    err = virGetLastError()
    return "no error" if err is None else err[2]


def virResetLastError() -> None:
    _last.err = None
