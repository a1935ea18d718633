"""``virConnect``, ``virDomain``, ``virDomainCheckpoint``: libvirt-python's objects on
jobcore's blocking facade (jobcore.facade), with libvirt's names, signatures and return
shapes. Every call goes through ``_api``, which turns whatever jobcore raises into the
``libvirtError`` libvirt raises there (jobcore.libvirt.errors).

A connection to ``qemu:///…`` or ``sim:///…`` reaches the jobd of the default run
directory when one answers there (jobcore.protocol.default_run_dir), else it runs the
driver in-process (``resolve_uri``). Domain events reach callbacks through the default
event loop (jobcore.libvirt.eventloop): a daemon thread per connection reads its job
events and posts libvirt's callbacks there.
"""

from __future__ import annotations

import functools
import socket
import sys
import threading
import traceback
import uuid as _uuid
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import attrs
from attrs import frozen

from jobcore import facade
from jobcore.errors import InvalidArgument, JobError, NoSuchCheckpoint, leaf_error
from jobcore.events import EventKind, JobEvent
from jobcore.libvirt import constants as C
from jobcore.libvirt.errors import libvirtError, make_error, to_libvirt_error
from jobcore.libvirt.eventloop import LOOP
from jobcore.lifecycle import JobState
from jobcore.log import get_logger
from jobcore.protocol import RW_SOCKET, default_run_dir, resolve_default_daemon
from jobcore.registry import registry
from jobcore.remote import RECONNECT_PARAM
from jobcore.spec import ChainRef, JobType
from jobcore.types.backup import BackupJobSpec
from jobcore.types.chain import BlockCommitSpec, BlockPullSpec
from jobcore.uri import parse_uri
from jobcore.xml import parse_job

log = get_logger("jobcore.libvirt")

MiB = 1 << 20
#: stats keys jobcore adds that libvirt's job stats do not have
_JOBCORE_KEYS = ("uuid", "state")

P = ParamSpec("P")
R = TypeVar("R")


class _Owned(Protocol):
    @property
    def _vconn(self) -> virConnect: ...


S = TypeVar("S", bound=_Owned)


def _api(
    name: str, *, writes: bool = False, overrides: Mapping[str, int] | None = None
) -> Callable[[Callable[Concatenate[S, P], R]], Callable[Concatenate[S, P], R]]:
    """A libvirt API ``name``: its errors cross as libvirtError; ``writes``: refused on a
    read-only connection, as libvirt refuses it."""
    table = dict(overrides or {})

    def wrap(fn: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
        def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            conn = self._vconn
            if conn._closed:  # libvirt-python: the handle is gone, libvirt sees NULL
                raise make_error(C.VIR_ERR_INVALID_CONN, name, _api_source(name))
            if writes and conn._readonly:
                raise make_error(C.VIR_ERR_OPERATION_DENIED, f"read only access prevents {name}")
            try:
                return fn(self, *args, **kwargs)
            except libvirtError:
                raise
            except Exception as exc:
                error = leaf_error(exc)
                if isinstance(error, libvirtError):
                    raise error from None
                conn._failed(error)
                raise to_libvirt_error(error, name, conn._from, table) from error

        functools.update_wrapper(call, fn)
        return call

    return wrap


def _api_source(name: str) -> int:
    """The error domain of libvirt's source file that holds API ``name``."""
    for part, domain in (
        ("Checkpoint", C.VIR_FROM_DOMAIN_CHECKPOINT),  # libvirt-domain-checkpoint.c
        ("Storage", C.VIR_FROM_STORAGE),  # libvirt-storage.c
        ("Domain", C.VIR_FROM_DOMAIN),  # libvirt-domain.c
    ):
        if part in name:
            return domain
    return C.VIR_FROM_NONE  # libvirt-host.c


class InProcessDomainWarning(RuntimeWarning):
    """A qemu domain was created without jobd: it lives only as long as this process."""


# ---- URIs -------------------------------------------------------------------------------


def resolve_uri(uri: str, readonly: bool = False) -> tuple[str, bool]:
    """The jobcore URI that serves libvirt URI ``uri``, and whether it is jobd's
    (jobcore.protocol.resolve_default_daemon: the rule jobctl follows too)."""
    return resolve_default_daemon(uri, readonly=readonly)


def _without_reconnect(uri: str) -> str:
    """A jobd URI whose client does not reconnect (unless ``uri`` says ``reconnect=``):
    as libvirt's, a connection whose daemon went away fails at once and stays dead."""
    parsed = parse_uri(uri)
    if parsed.param(RECONNECT_PARAM) is not None:
        return uri
    return str(attrs.evolve(parsed, params=(*parsed.params, (RECONNECT_PARAM, "0"))))


def _driver_domain(uri: str) -> int:
    try:
        driver = parse_uri(uri).driver
    except JobError:
        return C.VIR_FROM_NONE
    return {"qemu": C.VIR_FROM_QEMU, "sim": C.VIR_FROM_TEST}.get(driver, C.VIR_FROM_NONE)


# ---- events -----------------------------------------------------------------------------


@frozen
class _Registration:
    event_id: int
    domain: str | None
    callback: Callable[..., object]
    opaque: Any


@frozen
class _BlockJob:
    """What a job's BLOCK_JOB events say: libvirt's block job type and its disks."""

    kind: int
    disks: tuple[str, ...]
    pull_backup: bool = False


def libvirt_stats(stats: Mapping[str, Any], *, with_type: bool = True) -> dict[str, Any]:
    """jobcore's job stats with libvirt's keys only (JOB_COMPLETED has no 'type')."""
    drop = _JOBCORE_KEYS if with_type else (*_JOBCORE_KEYS, "type")
    return {k: v for k, v in stats.items() if k not in drop}


class _EventReader:
    """A connection's job events, turned into libvirt's domain event callbacks and posted
    to the default event loop (on a daemon thread: it never keeps the process alive)."""

    def __init__(self, vconn: virConnect) -> None:
        self.vconn = vconn
        bconn = vconn._bconn
        kinds = (EventKind.STATE, EventKind.FINAL)
        self.sub = facade.BlockingSubscription(
            bconn, bconn.run_sync(lambda: bconn.aconn.subscribe(kinds=kinds))
        )
        self._jobs: dict[_uuid.UUID, _BlockJob | None] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(
            target=self._run, daemon=True, name=f"libvirt events {vconn._uri}"
        )
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.sub.close()
        except Exception:  # the connection is already gone
            log.debug("event subscription close failed", exc_info=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ev = self.sub.get(timeout=0.5)
            except TimeoutError:
                continue
            except Exception as exc:  # closed connection, end of stream
                if not self._stop.is_set():
                    self.vconn._failed(leaf_error(exc))
                return
            try:
                self._dispatch(ev)
            except Exception:
                log.warning("domain event dispatch failed", exc_info=True)

    def _block_job(self, ev: JobEvent) -> _BlockJob | None:
        if ev.job in self._jobs:
            return self._jobs[ev.job]
        bconn = self.vconn._bconn
        found: _BlockJob | None = None
        try:
            job = bconn.run(bconn.aconn.lookup_job, ev.job)
            spec = parse_job(bconn.run(job.xml_desc))
        except JobError:
            spec = None
        if isinstance(spec, BlockPullSpec):
            found = _BlockJob(C.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL, (spec.disk,))
        elif isinstance(spec, BlockCommitSpec):
            kind = (
                C.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
                if spec.active
                else C.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT
            )
            found = _BlockJob(kind, (spec.disk,))
        elif isinstance(spec, BackupJobSpec):
            disks = tuple(d.name for d in spec.backup.included_disks())
            if not spec.backup.disks:
                disks = tuple(d.name for d in self._domain_info(ev.domain).disks)
            pull = spec.backup.effective_mode.value == "pull"
            found = _BlockJob(C.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP, disks, pull)
        self._jobs[ev.job] = found
        return found

    def _domain_info(self, name: str) -> Any:
        bconn = self.vconn._bconn
        return bconn.run(bconn.run(bconn.aconn.lookup_domain, name).info)

    def _dispatch(self, ev: JobEvent) -> None:
        regs = self.vconn._registrations_for(ev.domain)
        if not regs:
            return
        wanted = {r.event_id for r in regs}
        dom: virDomain | None = None
        if ev.kind is EventKind.FINAL and C.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED in wanted:
            try:
                domain_level = registry.get(ev.type).domain_level
            except JobError:
                domain_level = False
            if domain_level:
                dom = dom or self.vconn._event_domain(ev.domain)
                params = libvirt_stats(ev.stats or {}, with_type=False)
                for r in regs:
                    if r.event_id == C.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED:
                        _post(r.callback, self.vconn, dom, params, r.opaque)
        block_ids = {C.VIR_DOMAIN_EVENT_ID_BLOCK_JOB, C.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2}
        status = _block_status(ev)
        if status is None or not wanted & block_ids:
            if ev.kind is EventKind.FINAL:
                self._jobs.pop(ev.job, None)
            return
        bj = self._block_job(ev)
        if ev.kind is EventKind.FINAL:
            self._jobs.pop(ev.job, None)
        if bj is None:
            return
        if bj.kind == C.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP and status == C.VIR_DOMAIN_BLOCK_JOB_READY:
            return  # a backup's block jobs never converge in libvirt (its export is ready)
        if bj.pull_backup and status == C.VIR_DOMAIN_BLOCK_JOB_COMPLETED:
            status = C.VIR_DOMAIN_BLOCK_JOB_CANCELED  # libvirt: a pull backup ends by abort
        dom = dom or self.vconn._event_domain(ev.domain)
        paths: dict[str, str] = {}
        if C.VIR_DOMAIN_EVENT_ID_BLOCK_JOB in wanted:
            info = self._domain_info(ev.domain)
            paths = {d.name: d.source for d in info.disks}
        for disk in bj.disks:
            for r in regs:
                if r.event_id == C.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2:
                    _post(r.callback, self.vconn, dom, disk, bj.kind, status, r.opaque)
                elif r.event_id == C.VIR_DOMAIN_EVENT_ID_BLOCK_JOB and disk in paths:
                    _post(r.callback, self.vconn, dom, paths[disk], bj.kind, status, r.opaque)


def _block_status(ev: JobEvent) -> int | None:
    """The BLOCK_JOB status an event announces (READY, or the end: on the FINAL event, so
    that a backup's block job events follow its JOB_COMPLETED, as in libvirt)."""
    if ev.kind is EventKind.STATE and ev.state is JobState.READY:
        return C.VIR_DOMAIN_BLOCK_JOB_READY
    if ev.kind is EventKind.FINAL:
        return {
            JobState.COMPLETED: C.VIR_DOMAIN_BLOCK_JOB_COMPLETED,
            JobState.FAILED: C.VIR_DOMAIN_BLOCK_JOB_FAILED,
            JobState.CANCELLED: C.VIR_DOMAIN_BLOCK_JOB_CANCELED,
        }.get(ev.state)
    return None


def _post(callback: Callable[..., object], *args: Any) -> None:
    def run() -> None:
        try:
            callback(*args)
        except Exception:  # as libvirt-python: printed, the loop goes on
            traceback.print_exc(file=sys.stderr)

    LOOP.post(run)


# ---- virConnect -------------------------------------------------------------------------


class virConnect:
    """A connection, made by ``open``, ``openReadOnly`` or ``openAuth``."""

    def __init__(self, uri: str | None = None, *, readonly: bool = False) -> None:
        self._uri = uri or "qemu:///session"
        self._readonly = readonly
        self._from = _driver_domain(self._uri)
        self._closed = False
        self._lost = False
        self._lock = threading.Lock()
        self._callbacks: dict[int, _Registration] = {}
        self._next_callback = 1
        self._reader: _EventReader | None = None
        self._close_callback: tuple[Callable[..., object], Any] | None = None
        self._domains: dict[str, virDomain] = {}
        try:
            target, self.via_jobd = resolve_uri(self._uri, readonly)
            self._bconn = facade.open(_without_reconnect(target) if self.via_jobd else target)
        except Exception as exc:
            error = leaf_error(exc)
            detail = f"{self._uri}: {error}" if str(error) else self._uri
            if type(error).__name__ == "InvalidURI":
                raise make_error(C.VIR_ERR_NO_CONNECT, detail) from error
            raise to_libvirt_error(error, "virConnectOpen", self._from) from error

    @property
    def _vconn(self) -> virConnect:
        return self

    def __repr__(self) -> str:
        return f"<libvirt.virConnect {self._uri!r}>"

    def _failed(self, error: BaseException) -> None:
        """A call failed: a lost jobd connection is dead (isAlive 0, as libvirt's) and
        tells the close callback once (reason EOF)."""
        if type(error).__name__ in ("ConnectionLost", "DaemonUnreachable"):
            with self._lock:
                first, self._lost = not self._lost, True
            cb = self._close_callback
            if cb is not None and first:
                _post(cb[0], self, C.VIR_CONNECT_CLOSE_REASON_EOF, cb[1])

    # -- the connection

    def getURI(self) -> str:
        return self._uri

    def getType(self) -> str:
        return "QEMU" if self._from == C.VIR_FROM_QEMU else "Test"

    @_api("virConnectGetLibVersion")
    def getLibVersion(self) -> int:
        return C.LIB_VERSION

    @_api("virConnectGetVersion")
    def getVersion(self) -> int:
        return C.LIB_VERSION

    @_api("virConnectGetHostname")
    def getHostname(self) -> str:
        """This host's name (jobd runs here), so that programs stay in local mode."""
        return socket.gethostname()

    def isAlive(self) -> int:
        return 0 if self._closed or self._lost else 1

    def isSecure(self) -> int:
        return 1

    def isEncrypted(self) -> int:
        return 0

    def close(self) -> int:
        """Close the connection; domains served by jobd live on. Idempotent."""
        if self._closed:
            return 0
        self._closed = True
        if self._reader is not None:
            self._reader.stop()
        try:
            self._bconn.close()
        except Exception as exc:  # a lost jobd: nothing is left to close
            raise to_libvirt_error(leaf_error(exc), "virConnectClose", self._from) from exc
        return 0

    def registerCloseCallback(self, cb: Callable[..., object], opaque: Any = None) -> int:
        """``cb(conn, reason, opaque)`` when the connection to jobd is lost."""
        self._close_callback = (cb, opaque)
        return 0

    def unregisterCloseCallback(self) -> int:
        self._close_callback = None
        return 0

    # -- domains

    def _wrap(self, bdom: facade.BlockingDomain) -> virDomain:
        return virDomain(self, bdom)

    @_api("virDomainLookupByName")
    def lookupByName(self, name: str) -> virDomain:
        return self._wrap(self._bconn.lookupByName(name))

    @_api("virDomainLookupByUUIDString")
    def lookupByUUIDString(self, uuidstr: str) -> virDomain:
        try:
            wanted = _uuid.UUID(uuidstr)
        except (ValueError, TypeError):
            raise make_error(C.VIR_ERR_INVALID_ARG, f"invalid UUID '{uuidstr}'") from None
        return self._by_uuid(wanted)

    @_api("virDomainLookupByUUID")
    def lookupByUUID(self, uuid: bytes) -> virDomain:
        return self._by_uuid(_uuid.UUID(bytes=bytes(uuid)))

    def _by_uuid(self, wanted: _uuid.UUID) -> virDomain:
        for bdom in self._bconn.listAllDomains():
            if bdom.adom.uuid == wanted:
                return self._wrap(bdom)
        raise make_error(
            C.VIR_ERR_NO_DOMAIN, f"no domain with matching uuid '{wanted}'", self._from
        )

    @_api("virConnectListAllDomains")
    def listAllDomains(self, flags: int = 0) -> list[virDomain]:
        """Every domain (all running and transient: the INACTIVE, PERSISTENT, SHUTOFF,
        PAUSED, OTHER, MANAGEDSAVE, AUTOSTART, HAS_SNAPSHOT and HAS_CHECKPOINT filters
        select none of them; HAS_CHECKPOINT/NO_CHECKPOINT look at their checkpoints)."""
        if flags < 0 or flags >> 16:
            raise make_error(
                C.VIR_ERR_INVALID_ARG,
                f"unsupported flags ({flags:#x}) in function virConnectListAllDomains",
            )
        domains = [self._wrap(b) for b in self._bconn.listAllDomains()]
        # a filter group selects nothing only when none of its accepting bits is set
        groups = (
            (C.VIR_CONNECT_LIST_DOMAINS_ACTIVE, C.VIR_CONNECT_LIST_DOMAINS_INACTIVE),
            (C.VIR_CONNECT_LIST_DOMAINS_TRANSIENT, C.VIR_CONNECT_LIST_DOMAINS_PERSISTENT),
            (
                C.VIR_CONNECT_LIST_DOMAINS_RUNNING,
                C.VIR_CONNECT_LIST_DOMAINS_PAUSED
                | C.VIR_CONNECT_LIST_DOMAINS_SHUTOFF
                | C.VIR_CONNECT_LIST_DOMAINS_OTHER,
            ),
            (C.VIR_CONNECT_LIST_DOMAINS_NO_MANAGEDSAVE, C.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE),
            (C.VIR_CONNECT_LIST_DOMAINS_NO_AUTOSTART, C.VIR_CONNECT_LIST_DOMAINS_AUTOSTART),
            (C.VIR_CONNECT_LIST_DOMAINS_NO_SNAPSHOT, C.VIR_CONNECT_LIST_DOMAINS_HAS_SNAPSHOT),
        )
        for accepting, refusing in groups:
            if flags & (accepting | refusing) and not flags & accepting:
                return []
        has = flags & C.VIR_CONNECT_LIST_DOMAINS_HAS_CHECKPOINT
        lacks = flags & C.VIR_CONNECT_LIST_DOMAINS_NO_CHECKPOINT
        if bool(has) == bool(lacks):
            return domains
        return [d for d in domains if bool(d.listAllCheckpoints()) == bool(has)]

    @_api("virConnectNumOfDomains")
    def numOfDomains(self) -> int:
        return len(self._bconn.listAllDomains())

    @_api("virConnectListDefinedDomains")
    def listDefinedDomains(self) -> list[str]:
        return []  # every jobcore domain is running (none is merely defined)

    @_api("virDomainCreateXML", writes=True)
    def createXML(self, xmlDesc: str, flags: int = 0) -> virDomain:
        """Start a transient domain from libvirt's domain XML (what jobcore does not model
        is ignored: design/libvirt.md)."""
        dom = self._wrap(self._bconn.createXML(xmlDesc, flags))
        if not self.via_jobd and self._from == C.VIR_FROM_QEMU:
            warnings.warn(
                f"domain '{dom.name()}' runs in this process only: no jobd answers at "
                f"{default_run_dir() / RW_SOCKET}, so its QEMU stops when this process "
                "exits (libvirt would have started its session daemon; start jobd with "
                "'jobctl daemon --daemon')",
                InProcessDomainWarning,
                stacklevel=3,
            )
        return dom

    @_api("virDomainDefineXML", writes=True, overrides={"Unsupported": C.VIR_ERR_NO_SUPPORT})
    def defineXML(self, xml: str) -> virDomain:
        return self.defineXMLFlags(xml, 0)

    @_api("virDomainDefineXMLFlags", writes=True)
    def defineXMLFlags(self, xml: str, flags: int = 0) -> virDomain:
        """jobcore has no persistent (defined, not running) domains."""
        raise make_error(C.VIR_ERR_NO_SUPPORT, "virDomainDefineXMLFlags", self._from)

    # -- storage: jobcore has no storage pools

    @_api("virStoragePoolLookupByTargetPath")
    def storagePoolLookupByTargetPath(self, path: str) -> Any:
        raise make_error(
            C.VIR_ERR_NO_STORAGE_POOL,
            f"no storage pool with matching target path '{path}'",
            C.VIR_FROM_STORAGE,
        )

    @_api("virStoragePoolLookupByName")
    def storagePoolLookupByName(self, name: str) -> Any:
        raise make_error(
            C.VIR_ERR_NO_STORAGE_POOL,
            f"no storage pool with matching name '{name}'",
            C.VIR_FROM_STORAGE,
        )

    @_api("virStorageVolLookupByPath")
    def storageVolLookupByPath(self, path: str) -> Any:
        raise make_error(
            C.VIR_ERR_NO_STORAGE_VOL,
            f"no storage vol with matching path '{path}'",
            C.VIR_FROM_STORAGE,
        )

    @_api("virConnectListAllStoragePools")
    def listAllStoragePools(self, flags: int = 0) -> list[Any]:
        return []

    # -- domain events

    @_api("virConnectDomainEventRegisterAny")
    def domainEventRegisterAny(
        self,
        dom: virDomain | None,
        eventID: int,
        cb: Callable[..., object],
        opaque: Any = None,
    ) -> int:
        """Register ``cb`` for ``eventID`` (of ``dom``, or of every domain when None); the
        callbacks run in ``virEventRunDefaultImpl``. JOB_COMPLETED: ``cb(conn, dom,
        params, opaque)``; BLOCK_JOB (disk = the active layer's path) and BLOCK_JOB_2
        (disk = the target, e.g. 'vda'): ``cb(conn, dom, disk, type, status, opaque)``.
        Other events libvirt 9 knows register and never fire."""
        if not 0 <= eventID < C.VIR_DOMAIN_EVENT_ID_LAST:
            raise make_error(C.VIR_ERR_INVALID_ARG, f"unsupported event ID {eventID}")
        if not callable(cb):
            raise make_error(C.VIR_ERR_INVALID_ARG, "the callback must be callable")
        with self._lock:
            ident = self._next_callback
            self._next_callback += 1
            name = None if dom is None else dom.name()
            self._callbacks[ident] = _Registration(eventID, name, cb, opaque)
            start = self._reader is None and eventID in C.DELIVERED_EVENTS
        if start:
            self._reader = _EventReader(self)
        return ident

    @_api("virConnectDomainEventDeregisterAny")
    def domainEventDeregisterAny(self, callbackID: int) -> int:
        with self._lock:
            if self._callbacks.pop(callbackID, None) is None:
                raise make_error(
                    C.VIR_ERR_INVALID_ARG,
                    f"could not find event callback {callbackID} for deletion",
                )
        return 0

    def _registrations_for(self, domain: str) -> list[_Registration]:
        with self._lock:
            return [r for r in self._callbacks.values() if r.domain in (None, domain)]

    def _event_domain(self, name: str) -> virDomain:
        dom = self._domains.get(name)
        if dom is None:
            dom = self._wrap(self._bconn.lookupByName(name))
            self._domains[name] = dom
        return dom


# ---- virDomain --------------------------------------------------------------------------


def _bandwidth(value: int, flags: int, bytes_flag: int) -> int | None:
    """bytes/s from libvirt's bandwidth argument (MiB/s unless ``bytes_flag``); None: 0."""
    if value < 0:
        raise InvalidArgument("bandwidth must not be negative")
    if value == 0:
        return None
    return value if flags & bytes_flag else value * MiB


class virDomain:
    """A domain handle (from ``lookupByName``, ``createXML``, ``listAllDomains``…)."""

    def __init__(self, conn: virConnect, bdom: facade.BlockingDomain) -> None:
        self._conn = conn
        self._b = bdom

    @property
    def _vconn(self) -> virConnect:
        return self._conn

    def __repr__(self) -> str:
        return f"<libvirt.virDomain {self._b.name()!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, virDomain) and other._b.adom.uuid == self._b.adom.uuid

    def __hash__(self) -> int:
        return hash(self._b.adom.uuid)

    def connect(self) -> virConnect:
        return self._conn

    def name(self) -> str:
        return self._b.name()

    def UUIDString(self) -> str:
        return self._b.UUIDString()

    def UUID(self) -> bytes:
        return self._b.adom.uuid.bytes

    @_api("virDomainIsActive")
    def isActive(self) -> int:
        return self._b.isActive()

    def isPersistent(self) -> int:
        return 0  # jobcore's domains are transient (createXML)

    def isUpdated(self) -> int:
        return 0

    @_api("virDomainGetState")
    def state(self, flags: int = 0) -> list[int]:
        if self.isActive():
            return [C.VIR_DOMAIN_RUNNING, C.VIR_DOMAIN_RUNNING_BOOTED]
        return [C.VIR_DOMAIN_SHUTOFF, C.VIR_DOMAIN_SHUTOFF_UNKNOWN]

    @_api("virDomainGetInfo")
    def info(self) -> list[int]:
        """[state, maxMem KiB, memory KiB, vCPUs, cpuTime ns]."""
        info = self._conn._bconn.run(self._b.adom.info)
        kib = info.memory // 1024
        state = C.VIR_DOMAIN_RUNNING if info.running else C.VIR_DOMAIN_SHUTOFF
        return [state, kib, kib, 1, 0]

    @_api("virDomainGetXMLDesc")
    def XMLDesc(self, flags: int = 0) -> str:
        return self._b.XMLDesc(flags)

    @_api("virDomainDestroy", writes=True)
    def destroy(self) -> int:
        return self._b.destroy()

    @_api("virDomainGetAutostart")
    def autostart(self) -> int:
        return 0  # transient domains never start with the host

    @_api("virDomainSetAutostart", writes=True)
    def setAutostart(self, autostart: int) -> int:
        raise make_error(
            C.VIR_ERR_OPERATION_INVALID,
            "cannot set autostart for transient domain",
            self._conn._from,
        )

    # -- guest agent: jobcore domains have none

    def _no_agent(self) -> libvirtError:
        if not self.isActive():
            return make_error(
                C.VIR_ERR_OPERATION_INVALID, "domain is not running", self._conn._from
            )
        return make_error(
            C.VIR_ERR_ARGUMENT_UNSUPPORTED,
            "QEMU guest agent is not configured",
            self._conn._from,
        )

    @_api("virDomainFSFreeze", writes=True)
    def fsFreeze(self, mountpoints: list[str] | None = None, flags: int = 0) -> int:
        raise self._no_agent()

    @_api("virDomainFSThaw", writes=True)
    def fsThaw(self, mountpoints: list[str] | None = None, flags: int = 0) -> int:
        raise self._no_agent()

    # -- the domain job

    @_api("virDomainGetJobInfo")
    def jobInfo(self) -> list[int]:
        return self._b.jobInfo()

    @_api("virDomainGetJobStats")
    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        return libvirt_stats(self._b.jobStats(flags))

    @_api("virDomainAbortJob", writes=True)
    def abortJob(self) -> int:
        return self._b.abortJob()

    @_api("virDomainAbortJobFlags", writes=True)
    def abortJobFlags(self, flags: int = 0) -> int:
        if flags & C.VIR_DOMAIN_ABORT_JOB_POSTCOPY:
            raise make_error(
                C.VIR_ERR_OPERATION_INVALID,
                "current job is not outgoing migration in post-copy mode",
                self._conn._from,
            )
        if flags:
            raise make_error(
                C.VIR_ERR_INVALID_ARG,
                f"unsupported flags ({flags:#x}) in function virDomainAbortJobFlags",
            )
        return self._b.abortJob()

    @_api("virDomainBackupBegin", writes=True)
    def backupBegin(
        self,
        backupXML: str | None,
        checkpointXML: str | None = None,
        flags: int = 0,
    ) -> int:
        return self._b.backupBegin(backupXML, checkpointXML, flags)

    @_api("virDomainBackupGetXMLDesc", overrides={"NoSuchJob": C.VIR_ERR_NO_DOMAIN_BACKUP})
    def backupGetXMLDesc(self, flags: int = 0) -> str:
        return self._b.backupGetXMLDesc(flags)

    # -- block jobs

    @_api("virDomainGetBlockJobInfo")
    def blockJobInfo(self, path: str, flags: int = 0) -> dict[str, int]:
        """The disk's block job: a pull or commit, or else (as libvirt, which gives each
        disk of a backup a block job of type BACKUP) a running backup that reads it, so
        that virtnbdbackup's "active backup operation" check sees a backup left running
        by a killed run. A backup of other disks leaves this disk's entry ``{}``."""
        found = self._b.blockJobInfo(path, flags)
        if found:
            return found
        for job in self._b.listJobs():
            if job.ajob.type != JobType.BACKUP:
                continue
            info = facade.JobGetInfo(job)
            if not info.state.active:
                continue
            spec = parse_job(facade.JobGetXMLDesc(job))
            if isinstance(spec, BackupJobSpec) and path in self._backup_disks(spec):
                cur, end = info.processed, max(info.total, 1)
                return {
                    "type": C.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP,
                    "bandwidth": 0,
                    "cur": min(cur, end - 1),  # a live job never looks finished
                    "end": end,
                }
        return found

    def _backup_disks(self, spec: BackupJobSpec) -> set[str]:
        """The disks a backup reads: those it lists (unlisted: backup='no'), else all."""
        if spec.backup.disks:
            return {d.name for d in spec.backup.included_disks()}
        return {d.name for d in self._conn._bconn.run(self._b.adom.info).disks}

    @_api("virDomainBlockJobAbort", writes=True)
    def blockJobAbort(self, disk: str, flags: int = 0) -> int:
        return self._b.blockJobAbort(disk, flags)

    @_api("virDomainBlockPull", writes=True)
    def blockPull(self, disk: str, bandwidth: int = 0, flags: int = 0) -> int:
        return self._b.blockPull(disk, bandwidth, flags)

    @_api("virDomainBlockCommit", writes=True)
    def blockCommit(
        self, disk: str, base: str | None, top: str | None, bandwidth: int = 0, flags: int = 0
    ) -> int:
        return self._b.blockCommit(disk, base, top, bandwidth, flags)

    @_api("virDomainBlockRebase", writes=True)
    def blockRebase(self, disk: str, base: str | None, bandwidth: int = 0, flags: int = 0) -> int:
        """A block pull into ``base`` (None: the whole chain); the COPY variants (a block
        copy) are not modelled and raise VIR_ERR_ARGUMENT_UNSUPPORTED."""
        copy = (
            C.VIR_DOMAIN_BLOCK_REBASE_COPY
            | C.VIR_DOMAIN_BLOCK_REBASE_COPY_RAW
            | C.VIR_DOMAIN_BLOCK_REBASE_COPY_DEV
            | C.VIR_DOMAIN_BLOCK_REBASE_REUSE_EXT
            | C.VIR_DOMAIN_BLOCK_REBASE_SHALLOW
        )
        if flags & copy:
            raise make_error(
                C.VIR_ERR_ARGUMENT_UNSUPPORTED,
                "block copy (VIR_DOMAIN_BLOCK_REBASE_COPY) is not supported by jobcore",
                self._conn._from,
            )
        unknown = flags & ~(copy | C.VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES)
        if unknown:
            raise make_error(
                C.VIR_ERR_INVALID_ARG,
                f"unsupported flags ({unknown:#x}) in function virDomainBlockRebase",
            )
        spec = BlockPullSpec(
            disk,
            base=None if base is None else ChainRef(file=base),
            bandwidth=_bandwidth(bandwidth, flags, C.VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES),
        )
        self._conn._bconn.run(self._b.adom.job_begin_spec, spec, 0)
        return 0

    @_api("virDomainBlockJobSetSpeed", writes=True)
    def blockJobSetSpeed(self, disk: str, bandwidth: int, flags: int = 0) -> int:
        """The bandwidth of ``disk``'s block job (MiB/s unless BANDWIDTH_BYTES; 0: none)."""
        if flags & ~C.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES:
            raise make_error(
                C.VIR_ERR_INVALID_ARG,
                f"unsupported flags ({flags:#x}) in function virDomainBlockJobSetSpeed",
            )
        rate = _bandwidth(bandwidth, flags, C.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES)
        job = self._block_job(disk)
        facade.JobSetSpeed(job, rate or 0)
        return 0

    def _block_job(self, disk: str) -> facade.BlockingJob:
        """The active block pull or commit of ``disk``."""
        if self._b.blockJobInfo(disk):  # also InvalidArgument for a disk it lacks
            chain = (JobType.BLOCKPULL, JobType.BLOCKCOMMIT)
            for job in reversed(self._b.listJobs()):
                if job.type not in chain:
                    continue
                if not facade.JobGetInfo(job).state.active:
                    continue
                spec = parse_job(facade.JobGetXMLDesc(job))
                if getattr(spec, "disk", None) == disk:
                    return job
        raise make_error(
            C.VIR_ERR_OPERATION_INVALID,
            f"disk '{disk}' does not have an active block job",
            self._conn._from,
        )

    # -- checkpoints

    @_api("virDomainCheckpointCreateXML", writes=True)
    def checkpointCreateXML(self, xmlDesc: str, flags: int = 0) -> virDomainCheckpoint:
        return virDomainCheckpoint(self, self._b.checkpointCreateXML(xmlDesc, flags))

    @_api("virDomainListAllCheckpoints")
    def listAllCheckpoints(self, flags: int = 0) -> list[virDomainCheckpoint]:
        return [virDomainCheckpoint(self, c) for c in self._b.listAllCheckpoints(flags)]

    @_api("virDomainCheckpointLookupByName")
    def checkpointLookupByName(self, name: str, flags: int = 0) -> virDomainCheckpoint:
        return virDomainCheckpoint(self, self._b.checkpointLookupByName(name, flags))

    # -- libvirt_qemu

    @_api(
        "virDomainQemuMonitorCommand",
        writes=True,
        overrides={"Unsupported": C.VIR_ERR_NO_SUPPORT},
    )
    def _qemu_monitor_command(self, cmd: str, flags: int = 0) -> str:
        return self._b.qemuMonitorCommand(cmd, flags)

    @_api("virDomainQemuAgentCommand", writes=True)
    def _qemu_agent_command(self, cmd: str, timeout: int, flags: int) -> str:
        raise self._no_agent()


# ---- virDomainCheckpoint ----------------------------------------------------------------


class virDomainCheckpoint:
    """A checkpoint of a domain (jobcore's persistent checkpoints)."""

    def __init__(self, dom: virDomain, bcp: facade.BlockingCheckpoint) -> None:
        self._dom = dom
        self._b = bcp

    @property
    def _vconn(self) -> virConnect:
        return self._dom._conn

    def __repr__(self) -> str:
        return f"<libvirt.virDomainCheckpoint {self.getName()!r} of {self._dom.name()!r}>"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, virDomainCheckpoint)
            and other._dom == self._dom
            and other.getName() == self.getName()
        )

    def __hash__(self) -> int:
        return hash((self._dom, self.getName()))

    def getName(self) -> str:
        return self._b.getName()

    def domain(self) -> virDomain:
        return self._dom

    def getConnect(self) -> virConnect:
        return self._dom._conn

    def connect(self) -> virConnect:
        return self._dom._conn

    @_api("virDomainCheckpointGetXMLDesc")
    def getXMLDesc(self, flags: int = 0) -> str:
        return self._b.getXMLDesc(flags)

    @_api("virDomainCheckpointGetParent")
    def getParent(self, flags: int = 0) -> virDomainCheckpoint:
        return virDomainCheckpoint(self._dom, self._b.getParent(flags))

    @_api("virDomainCheckpointDelete", writes=True)
    def delete(self, flags: int = 0) -> int:
        return self._b.delete(flags)

    @_api("virDomainCheckpointListAllChildren")
    def listAllChildren(self, flags: int = 0) -> list[virDomainCheckpoint]:
        """The checkpoints whose parent is this one (DESCENDANTS: and theirs)."""
        if flags & ~C.VIR_DOMAIN_CHECKPOINT_LIST_DESCENDANTS:
            raise make_error(
                C.VIR_ERR_INVALID_ARG,
                f"unsupported flags ({flags:#x}) in function virDomainCheckpointListAllChildren",
            )
        parents: dict[str, str | None] = {}
        every = self._dom.listAllCheckpoints()
        for cp in every:
            try:
                parents[cp.getName()] = cp._b.getParent(0).getName()
            except NoSuchCheckpoint:  # a root: libvirt's getParent raises
                parents[cp.getName()] = None
        wanted = {self.getName()}
        found: list[virDomainCheckpoint] = []
        grew = True
        while grew:
            grew = False
            for cp in every:
                name = cp.getName()
                if parents[name] in wanted and name not in wanted and cp not in found:
                    found.append(cp)
                    if flags & C.VIR_DOMAIN_CHECKPOINT_LIST_DESCENDANTS:
                        wanted.add(name)
                        grew = True
        return found
