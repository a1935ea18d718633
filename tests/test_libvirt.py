"""jobcore.libvirt in-process on sim: libvirt's error codes for the common failures, the
error handler, the default event loop, and the domain events."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import jobcore.libvirt as libvirt

BACKUP_VDA = (
    "<domainbackup><disks><disk name='vda' type='file'><target file='/b/{tag}.qcow2'/>"
    "</disk><disk name='vdb' backup='no'/></disks></domainbackup>"
)


@pytest.fixture(autouse=True)
def no_default_jobd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run directory of this test's own: no jobd answers there, so every URI runs
    in-process."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))


@pytest.fixture
def errors() -> Iterator[list[tuple[Any, tuple[Any, ...]]]]:
    """Every error the module reports, through registerErrorHandler (with keywords)."""
    seen: list[tuple[Any, tuple[Any, ...]]] = []
    assert libvirt.registerErrorHandler(f=lambda ctx, err: seen.append((ctx, err)), ctx="c") == 1
    yield seen
    libvirt.registerErrorHandler(None, None)


@pytest.fixture
def conn(errors: list[Any]) -> Iterator[libvirt.virConnect]:
    c = libvirt.open("sim:///default?rate=1048576")  # 1 MiB/s: jobs stay running
    assert not c.via_jobd
    yield c
    c.close()


def code(exc: pytest.ExceptionInfo[libvirt.libvirtError]) -> int | None:
    return exc.value.get_error_code()


def test_connection_basics(conn: libvirt.virConnect) -> None:
    assert conn.getLibVersion() == 9_000_000 == libvirt.getVersion()
    assert conn.getURI() == "sim:///default?rate=1048576"
    assert sorted(d.name() for d in conn.listAllDomains()) == ["vm1", "vm2"]
    assert conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE) == []
    assert len(conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)) == 2
    dom = conn.lookupByName("vm1")
    assert conn.lookupByUUIDString(dom.UUIDString()) == dom
    assert conn.lookupByUUID(dom.UUID()).name() == "vm1"
    assert dom.isActive() == 1 and dom.autostart() == 0 and dom.isPersistent() == 0
    assert dom.blockJobInfo("vda") == {}
    assert dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE


def test_no_such_domain(conn: libvirt.virConnect, errors: list[Any]) -> None:
    with pytest.raises(libvirt.libvirtError) as exc:
        conn.lookupByName("vm9")
    assert code(exc) == libvirt.VIR_ERR_NO_DOMAIN == 42
    assert exc.value.get_error_domain() == libvirt.VIR_FROM_TEST
    message = exc.value.get_error_message()
    assert message is not None and message.startswith("Domain not found: ")
    assert str(exc.value) == message and "vm9" in message
    assert exc.value.get_error_level() == libvirt.VIR_ERR_ERROR
    assert errors[-1] == ("c", exc.value.err)
    assert libvirt.virGetLastErrorCode() == 42
    with pytest.raises(libvirt.libvirtError) as exc:
        conn.lookupByUUIDString("8c6d9c56-0cc0-4ab2-9e4c-3b0a9b4f4b5e")
    assert code(exc) == 42


def test_operation_invalid(conn: libvirt.virConnect) -> None:
    dom = conn.lookupByName("vm1")
    with pytest.raises(libvirt.libvirtError) as exc:
        dom.abortJob()
    assert code(exc) == libvirt.VIR_ERR_OPERATION_INVALID == 55
    assert str(exc.value) == "Requested operation is not valid: no job is active on the domain"
    with pytest.raises(libvirt.libvirtError) as exc:
        dom.setAutostart(1)
    assert code(exc) == 55
    with pytest.raises(libvirt.libvirtError) as exc:
        dom.blockJobSetSpeed("vda", 1)
    assert code(exc) == 55


def test_no_backup_no_pool_no_agent(conn: libvirt.virConnect) -> None:
    dom = conn.lookupByName("vm1")
    with pytest.raises(libvirt.libvirtError) as exc:
        dom.backupGetXMLDesc()
    assert code(exc) == libvirt.VIR_ERR_NO_DOMAIN_BACKUP == 104
    with pytest.raises(libvirt.libvirtError) as exc:
        conn.storagePoolLookupByTargetPath("/var/tmp")
    assert code(exc) == libvirt.VIR_ERR_NO_STORAGE_POOL == 49
    assert exc.value.get_error_domain() == libvirt.VIR_FROM_STORAGE
    with pytest.raises(libvirt.libvirtError) as exc:
        conn.storagePoolLookupByName("default")
    assert code(exc) == 49
    for call in (dom.fsFreeze, dom.fsThaw):
        with pytest.raises(libvirt.libvirtError) as exc:
            call()
        assert code(exc) == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED
        assert str(exc.value) == "argument unsupported: QEMU guest agent is not configured"
    with pytest.raises(libvirt.libvirtError) as exc:
        dom.blockJobInfo("vdz")
    assert code(exc) == libvirt.VIR_ERR_INVALID_ARG


def test_conflicting_jobs(conn: libvirt.virConnect) -> None:
    """A second block job on a disk: libvirt's "already in active block job" (84); a
    backup of a disk in a block job: "has a blockjob assigned" (1). Other disks run on."""
    dom = conn.lookupByName("vm1")
    assert dom.blockPull("vda") == 0
    with pytest.raises(libvirt.libvirtError) as exc:
        dom.blockPull("vda")
    assert code(exc) == libvirt.VIR_ERR_OPERATION_UNSUPPORTED == 84
    assert str(exc.value) == "Operation not supported: disk 'vda' already in active block job"
    with pytest.raises(libvirt.libvirtError) as exc:
        dom.blockRebase("vda", None)
    assert code(exc) == 84
    with pytest.raises(libvirt.libvirtError) as exc:
        dom.backupBegin(BACKUP_VDA.format(tag="c1"), None)
    assert code(exc) == libvirt.VIR_ERR_INTERNAL_ERROR
    assert "disk 'vda' has a blockjob assigned" in str(exc.value)
    # another disk's backup runs beside the pull (real libvirt: one domain job, and only
    # while no other job holds the state change lock)
    vdb_only = (
        "<domainbackup><disks><disk name='vda' backup='no'/><disk name='vdb' type='file'>"
        "<target file='/b/c2.qcow2'/></disk></disks></domainbackup>"
    )
    assert dom.backupBegin(vdb_only, None) == 0
    assert dom.jobStats()["operation"] == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
    assert dom.blockJobInfo("vda")["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL
    assert dom.blockJobSetSpeed("vda", 2) == 0
    assert dom.blockJobInfo("vda")["bandwidth"] == 2
    bytes_flag = libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES
    assert dom.blockJobSetSpeed("vda", 3 << 20, bytes_flag) == 0
    info_bytes = libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES
    assert dom.blockJobInfo("vda", info_bytes)["bandwidth"] == 3 << 20
    assert dom.abortJob() == 0 and dom.blockJobAbort("vda") == 0
    assert dom.blockJobInfo("vda") == {}


def test_bad_flags_and_unsupported(conn: libvirt.virConnect) -> None:
    dom = conn.lookupByName("vm1")
    with pytest.raises(libvirt.libvirtError) as exc:
        dom.blockRebase("vda", None, 0, libvirt.VIR_DOMAIN_BLOCK_REBASE_COPY)
    assert code(exc) == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED
    with pytest.raises(libvirt.libvirtError) as exc:
        dom.blockPull("vda", 0, 1 << 20)
    assert code(exc) == libvirt.VIR_ERR_INVALID_ARG
    assert "unsupported flags" in str(exc.value)
    with pytest.raises(libvirt.libvirtError) as exc:
        conn.defineXML("<domain/>")
    assert code(exc) == libvirt.VIR_ERR_NO_SUPPORT
    with pytest.raises(libvirt.libvirtError) as exc:
        dom.backupBegin("<domainbackup", None)
    assert code(exc) == libvirt.VIR_ERR_XML_ERROR


def test_read_only(errors: list[Any]) -> None:
    conn = libvirt.openReadOnly("sim:///default")
    try:
        dom = conn.lookupByName("vm1")
        assert dom.blockJobInfo("vda") == {}
        with pytest.raises(libvirt.libvirtError) as exc:
            dom.blockPull("vda")
        assert code(exc) == libvirt.VIR_ERR_OPERATION_DENIED
        assert str(exc.value) == "operation forbidden: read only access prevents virDomainBlockPull"
    finally:
        conn.close()
    auth = [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], lambda *a: 0, None]
    conn = libvirt.openAuth("sim:///default", auth, libvirt.VIR_CONNECT_RO)
    try:
        with pytest.raises(libvirt.libvirtError) as exc:
            conn.lookupByName("vm1").abortJob()
        assert code(exc) == libvirt.VIR_ERR_OPERATION_DENIED
    finally:
        conn.close()


def test_no_connection_driver(errors: list[Any]) -> None:
    with pytest.raises(libvirt.libvirtError) as exc:
        libvirt.open("nosuch:///x")
    assert code(exc) == libvirt.VIR_ERR_NO_CONNECT
    assert str(exc.value).startswith("no connection driver available for nosuch:///x")


def test_default_error_handler_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a handler, errors are printed as libvirt's default handler prints them."""
    libvirt.registerErrorHandler(None, None)
    conn = libvirt.open("sim:///default")
    try:
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName("vm9")
    finally:
        conn.close()
    assert "libvirt: Test Driver error : Domain not found: " in capsys.readouterr().err


# ---- the default event loop --------------------------------------------------------------


def test_event_loop_timeouts_and_handles() -> None:
    libvirt.virEventRegisterDefaultImpl()
    fired: list[tuple[str, int, threading.Thread]] = []
    timer = libvirt.virEventAddTimeout(
        0, lambda t, o: fired.append((o, t, threading.current_thread())), "tick"
    )
    r, w = os.pipe()
    watch = libvirt.virEventAddHandle(
        r,
        libvirt.VIR_EVENT_HANDLE_READABLE,
        lambda wt, fd, ev, o: fired.append((o, ev, threading.current_thread())),
        "readable",
    )
    try:
        libvirt.virEventRunDefaultImpl()
        assert [f[0] for f in fired] == ["tick"]
        os.write(w, b"x")
        libvirt.virEventUpdateTimeout(timer, -1)  # disabled
        libvirt.virEventRunDefaultImpl()
        assert [f[:2] for f in fired[1:]] == [("readable", libvirt.VIR_EVENT_HANDLE_READABLE)]
        assert all(f[2] is threading.current_thread() for f in fired)
    finally:
        assert libvirt.virEventRemoveTimeout(timer) == 0
        assert libvirt.virEventRemoveHandle(watch) == 0
        os.close(r)
        os.close(w)
    assert libvirt.virEventRemoveTimeout(timer) == -1


def run_until(done: Any, limit: int = 10_000) -> None:
    for _ in range(limit):
        if done():
            return
        libvirt.virEventRunDefaultImpl()
    raise AssertionError("the events never came")


def test_job_completed_and_block_job_events(errors: list[Any]) -> None:
    libvirt.virEventRegisterDefaultImpl()
    conn = libvirt.open("sim:///default")
    try:
        dom = conn.lookupByName("vm1")
        got: list[tuple[Any, ...]] = []
        opaque = object()
        on_any = conn.domainEventRegisterAny(
            None,
            libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
            lambda c, d, params, o: got.append(("completed", c, d.name(), params, o)),
            opaque,
        )
        for event_id in (
            libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB,
            libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
        ):
            conn.domainEventRegisterAny(
                dom,
                event_id,
                lambda c, d, disk, kind, status, o, e=event_id: got.append(
                    (e, c, d.name(), disk, kind, status, o)
                ),
                opaque,
            )
        assert dom.backupBegin(BACKUP_VDA.format(tag="ev"), None) == 0
        run_until(lambda: len(got) >= 3)
        completed = got[0]
        assert completed[:3] == ("completed", conn, "vm1") and completed[4] is opaque
        params = completed[3]
        assert params["operation"] == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
        assert params["success"] is True
        assert params["disk_processed"] == params["disk_total"] > 0
        assert {"time_elapsed", "disk_remaining"} <= set(params)
        assert not {"type", "uuid", "state"} & set(params)
        backup = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP
        ok = libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED
        blocks = {g[0]: g[3:6] for g in got[1:3]}
        assert blocks[libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2] == ("vda", backup, ok)
        path = blocks[libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB][0]
        assert path.startswith("/") and path.endswith("vda.qcow2")
        del got[:]
        assert conn.domainEventDeregisterAny(on_any) == 0
        assert dom.blockPull("vdb") == 0
        run_until(lambda: len(got) >= 2)
        assert {g[0]: g[3:6] for g in got}[libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2] == (
            "vdb",
            libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL,
            ok,
        )
        assert all(g[0] != "completed" for g in got)  # deregistered (and not a domain job)
        with pytest.raises(libvirt.libvirtError) as exc:
            conn.domainEventDeregisterAny(on_any)
        assert code(exc) == libvirt.VIR_ERR_INVALID_ARG
    finally:
        conn.close()


def test_conflict_mapping_per_resource(errors: list[Any]) -> None:
    """libvirt's wording of each kind of conflict (the scheduler's resource names)."""
    import uuid

    from jobcore.errors import JobConflict
    from jobcore.libvirt.errors import to_libvirt_error

    holder = uuid.uuid4()

    def mapped(resource: str, api: str) -> libvirt.libvirtError:
        exc = JobConflict("conflict", holder=holder, resource=resource)
        return to_libvirt_error(exc, api, libvirt.VIR_FROM_QEMU)

    busy = mapped("domain:vm1", "virDomainBackupBegin")
    assert busy.get_error_code() == libvirt.VIR_ERR_OPERATION_TIMEOUT
    assert str(busy) == (
        f"Timed out during operation: cannot acquire state change lock (held by job {holder})"
    )
    assert busy.get_error_domain() == libvirt.VIR_FROM_QEMU
    disk = mapped("disk:vm1/vdb", "virDomainBlockCommit")
    assert disk.get_error_code() == libvirt.VIR_ERR_OPERATION_UNSUPPORTED
    assert str(disk) == "Operation not supported: disk 'vdb' already in active block job"
    assert mapped("file:/b/x", "virDomainBackupBegin").get_error_code() == 55


def test_pull_backup_events(tmp_path: Path, errors: list[Any]) -> None:
    """A pull backup ends by abortJob: JOB_COMPLETED says success, then BLOCK_JOB_2 says
    CANCELED for its disk, as libvirt reports them; its ready export sends no READY."""
    libvirt.virEventRegisterDefaultImpl()
    conn = libvirt.open("sim:///default")
    try:
        dom = conn.lookupByName("vm1")
        got: list[tuple[Any, ...]] = []
        conn.domainEventRegisterAny(
            dom,
            libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
            lambda c, d, params, o: got.append(("completed", params["success"])),
            None,
        )
        conn.domainEventRegisterAny(
            dom,
            libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
            lambda c, d, disk, kind, status, o: got.append((disk, kind, status)),
            None,
        )
        pull = (
            "<domainbackup mode='pull'>"
            f"<server transport='unix' socket='{tmp_path}/nbd.sock'/><disks>"
            f"<disk name='vda' type='file'><scratch file='{tmp_path}/s.qcow2'/></disk>"
            "<disk name='vdb' backup='no'/></disks></domainbackup>"
        )
        assert dom.backupBegin(pull, None) == 0
        assert dom.jobStats()["type"] == libvirt.VIR_DOMAIN_JOB_UNBOUNDED
        assert dom.abortJob() == 0
        run_until(lambda: len(got) >= 2)
        assert got == [
            ("completed", True),
            (
                "vda",
                libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP,
                libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED,
            ),
        ]
    finally:
        conn.close()


def test_checkpoints(errors: list[Any]) -> None:
    """Checkpoints made with backups, looked up, described, parents and children,
    redefined from their own XML, deleted; a missing one is libvirt's 103."""
    libvirt_conn = libvirt.open("sim:///default?rate=0")  # instant backups
    try:
        dom = libvirt_conn.lookupByName("vm1")
        assert dom.listAllCheckpoints() == []
        with pytest.raises(libvirt.libvirtError) as exc:
            dom.checkpointLookupByName("virtnbdbackup.0")
        assert code(exc) == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT == 103
        assert exc.value.get_error_domain() == libvirt.VIR_FROM_DOMAIN_CHECKPOINT
        assert str(exc.value).startswith("Domain checkpoint not found: ")
        for n, incremental in ((0, ""), (1, "<incremental>cp0</incremental>")):
            backup = BACKUP_VDA.format(tag=f"cp{n}").replace("</disks>", f"</disks>{incremental}")
            checkpoint = f"<domaincheckpoint><name>cp{n}</name></domaincheckpoint>"
            assert dom.backupBegin(backup, checkpoint) == 0
            assert dom.checkpointLookupByName(f"cp{n}").getName() == f"cp{n}"
        cp0, cp1 = dom.listAllCheckpoints()
        assert (cp0.getName(), cp1.getName()) == ("cp0", "cp1")
        assert cp1.getParent() == cp0 and cp1.domain() == dom and cp1.getConnect() is libvirt_conn
        with pytest.raises(libvirt.libvirtError) as exc:
            cp0.getParent()
        assert code(exc) == 103
        assert cp0.listAllChildren() == [cp1]
        assert cp0.listAllChildren(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_DESCENDANTS) == [cp1]
        roots = dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS)
        assert [c.getName() for c in roots] == ["cp0"]
        sized = cp1.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE)
        assert "<name>cp1</name>" in sized and "size=" in sized
        saved = cp1.getXMLDesc()
        assert cp1.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY) == 0
        with pytest.raises(libvirt.libvirtError) as exc:
            dom.checkpointLookupByName("cp1")
        assert code(exc) == 103
        again = dom.checkpointCreateXML(saved, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
        assert again.getName() == "cp1" and again.getParent() == cp0
        assert [c.getName() for c in dom.listAllCheckpoints()] == ["cp0", "cp1"]
        assert cp0.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN) == 0
        assert dom.listAllCheckpoints() == []
        has = libvirt.VIR_CONNECT_LIST_DOMAINS_HAS_CHECKPOINT
        assert libvirt_conn.listAllDomains(has) == []
    finally:
        libvirt_conn.close()


def test_domain_xml_and_monitor_on_sim(conn: libvirt.virConnect) -> None:
    from jobcore.libvirt import qemu as libvirt_qemu

    dom = conn.lookupByName("vm1")
    xml = dom.XMLDesc(0).replace('"', "'")
    assert xml.startswith("<domain") and "<target dev='vda'" in xml and "<name>vm1</name>" in xml
    with pytest.raises(libvirt.libvirtError) as exc:
        libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-status"}', 0)
    assert code(exc) == libvirt.VIR_ERR_NO_SUPPORT
    assert str(exc.value) == (
        "this function is not supported by the connection driver: virDomainQemuMonitorCommand"
    )
    with pytest.raises(libvirt.libvirtError) as exc:
        libvirt_qemu.qemuAgentCommand(dom, '{"execute": "guest-ping"}', -1, 0)
    assert code(exc) == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED


def test_block_job_info_shows_a_running_backup_of_the_disk(tmp_path: Path) -> None:
    """As libvirt gives each disk of a backup a block job of type BACKUP, blockJobInfo of
    a disk a running backup reads says so (virtnbdbackup's "active backup operation" check,
    after a killed run left its pull backup running); other disks stay ``{}``."""
    conn = libvirt.open("sim:///default?rate=1048576")  # jobs stay running
    try:
        dom = conn.lookupByName("vm1")
        pull = (
            "<domainbackup mode='pull'>"
            f"<server transport='unix' socket='{tmp_path}/nbd.sock'/><disks>"
            f"<disk name='vda' type='file'><scratch file='{tmp_path}/s.qcow2'/></disk>"
            "</disks></domainbackup>"
        )
        assert dom.backupBegin(pull, None) == 0
        info = dom.blockJobInfo("vda")
        assert info["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP
        assert set(info) == {"type", "bandwidth", "cur", "end"} and info["cur"] < info["end"]
        assert dom.blockJobInfo("vdb") == {}  # unlisted: backup='no'
        assert dom.blockPull("vdb") == 0  # and free for a block job
        assert dom.abortJob() == 0
        assert dom.blockJobInfo("vda") == {}
    finally:
        conn.close()


def test_calls_on_a_closed_connection(errors: list[Any]) -> None:
    """libvirt-python drops a closed connection's handle: its calls fail with
    VIR_ERR_INVALID_CONN "invalid connection pointer in virX", not an internal error."""
    conn = libvirt.open("sim:///default")
    dom = conn.lookupByName("vm1")
    assert conn.close() == 0
    for call, name, domain in (
        (lambda: conn.lookupByName("vm1"), "virDomainLookupByName", libvirt.VIR_FROM_DOMAIN),
        (conn.listAllDomains, "virConnectListAllDomains", libvirt.VIR_FROM_DOMAIN),
        (conn.getLibVersion, "virConnectGetLibVersion", libvirt.VIR_FROM_NONE),
        (dom.info, "virDomainGetInfo", libvirt.VIR_FROM_DOMAIN),
    ):
        with pytest.raises(libvirt.libvirtError) as exc:
            call()
        assert code(exc) == libvirt.VIR_ERR_INVALID_CONN == 6
        assert str(exc.value) == f"invalid connection pointer in {name}"
        assert exc.value.get_error_domain() == domain


def test_event_dispatch_failure_is_logged_not_printed(
    errors: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A failure in the events thread goes to the stdlib logger ``jobcore.libvirt`` (silent
    unless the application configures logging), never to stdout as structlog's default
    configuration would print it; the thread keeps reading events."""
    from jobcore.libvirt import objects

    calls: list[str] = []

    def broken(self: Any, ev: Any) -> None:
        calls.append(ev.kind)
        raise RuntimeError("dispatch broke")

    monkeypatch.setattr(objects._EventReader, "_dispatch", broken)
    libvirt.virEventRegisterDefaultImpl()
    conn = libvirt.open("sim:///default")
    caplog.set_level("WARNING", logger="jobcore.libvirt")
    try:
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, lambda *a: None, None
        )
        dom = conn.lookupByName("vm1")
        assert dom.backupBegin(BACKUP_VDA.format(tag="broken"), None) == 0
        deadline = time.monotonic() + 30  # nothing reaches the event loop: poll
        while len(calls) < 2 and time.monotonic() < deadline:  # on after the first failure
            time.sleep(0.01)
        assert len(calls) >= 2
    finally:
        conn.close()
    failures = [r for r in caplog.records if r.name == "jobcore.libvirt"]
    assert failures and "domain event dispatch failed" in str(failures[0].msg)
    assert failures[0].exc_info is not None and "dispatch broke" in str(failures[0].exc_info[1])
    assert "dispatch" not in capsys.readouterr().out
