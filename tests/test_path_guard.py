"""H6: a client jobd allows whose uid is neither jobd's own nor root may only make jobd
read or write files it owns (jobcore.paths; design/daemon.md, "Access model")."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from jobd_helpers import Jobd, RawClient
from qemu_helpers import create, domain_xml

import jobcore
from jobcore.local import LocalConnection, as_local
from jobcore.paths import Access, PathKind, PathUse, check_owned, owner_guard
from jobcore.protocol import AccessDenied
from jobcore.registry import registry
from jobcore.types.backup import BackupJobSpec

ME = os.getuid()
OTHER = 12345 if ME != 12345 else 12346
needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: files are chowned to, and the client runs as, uid 12345 (CI runs as root)",
)


def use(path: Path | str, access: Access = Access.WRITE, kind: PathKind = PathKind.FILE) -> PathUse:
    return PathUse(str(path), access, "target of disk 'vda'", kind)


# ---- the rule itself -------------------------------------------------------------------


def test_own_file_in_own_private_directory_passes(tmp_path: Path) -> None:
    (tmp_path / "img").write_bytes(b"x")
    check_owned(use(tmp_path / "img", Access.READ), ME)
    check_owned(use(tmp_path / "new.qcow2"), ME)  # to be created
    check_owned(use(tmp_path / "sub" / "deeper" / "new"), ME)  # nearest existing: tmp_path


def test_file_or_directory_of_another_uid_is_refused(tmp_path: Path) -> None:
    (tmp_path / "img").write_bytes(b"x")
    with pytest.raises(
        AccessDenied, match=rf"'{tmp_path}/img' \(read\) for uid {OTHER}: it is owned by uid {ME}"
    ):
        check_owned(use(tmp_path / "img", Access.READ), OTHER)
    with pytest.raises(AccessDenied, match=rf"its directory '{tmp_path}' is owned by uid {ME}"):
        check_owned(use(tmp_path / "new"), OTHER)
    guard = owner_guard(OTHER)
    with pytest.raises(AccessDenied, match="new2"):  # the first path it refuses
        guard([use(tmp_path / "new2"), use(tmp_path / "new3")])
    owner_guard(ME)([use(tmp_path / "img", Access.READ), use(tmp_path / "new")])


def test_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(AccessDenied, match=r"writable by group or others \(mode 1777\)"):
        check_owned(use(shared / "new"), ME)


def test_symbolic_links_are_followed_and_dangling_ones_refused(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/etc/passwd")  # owned by root
    if ME != 0:
        with pytest.raises(AccessDenied, match="it is owned by uid 0"):
            check_owned(use(tmp_path / "link", Access.READ), ME)
    with pytest.raises(AccessDenied, match="owned by uid 0"):
        check_owned(use(tmp_path / "link", Access.READ), OTHER)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(AccessDenied, match="dangling symbolic link"):
        check_owned(use(tmp_path / "dangling"), ME)
    # a directory link leads to the real parent: /etc is root's
    (tmp_path / "etc").symlink_to("/etc")
    with pytest.raises(AccessDenied, match=r"its directory '/etc(/cron\.d)?' is owned by uid 0"):
        check_owned(use(tmp_path / "etc" / "cron.d" / "x"), OTHER)


def test_kind_relative_path_and_fifo_are_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(AccessDenied, match="it is not a file"):
        check_owned(use(tmp_path / "fifo", Access.READ), ME)
    with pytest.raises(AccessDenied, match="it is not a socket"):
        check_owned(use(tmp_path / "fifo", kind=PathKind.SOCKET), ME)
    with pytest.raises(AccessDenied, match="the path is not absolute"):
        check_owned(use("relative/x"), ME)


# ---- the engine hands a guard every path of the prepared spec -------------------------


class Recorder:
    def __init__(self, refuse: str | None = None) -> None:
        self.uses: list[PathUse] = []
        self.refuse = refuse

    def __call__(self, uses: Iterable[PathUse]) -> None:
        for u in uses:
            self.uses.append(u)
            if u.path == self.refuse:
                raise AccessDenied(f"refused {u.path}")


BACKUP = (
    "<job type='backup'><domainbackup><disks><disk name='vda'/><disk name='vdb'>"
    "<target file='/backups/vdb.qcow2'/></disk></disks></domainbackup></job>"
)


@pytest.mark.anyio
async def test_guard_sees_prepared_paths_before_the_driver() -> None:
    async with jobcore.connect("sim:///guard?rate=0") as conn:
        dom = await as_local(conn).lookup_domain("vm1")
        seen = Recorder()
        dom.path_guard = seen  # a handle carries its holder's guard (jobd's do)
        job = await dom.job_begin(BACKUP)
        await job.wait(10)
        writes = {u.path for u in seen.uses if u.access is Access.WRITE}
        reads = {u.path for u in seen.uses if u.access is Access.READ}
        # the default target the engine derived (``<source>.<suffix>``) is there
        assert "/backups/vdb.qcow2" in writes
        assert any(p.startswith("/var/lib/sim/vm1/vda.qcow2.") for p in writes)
        assert {"/var/lib/sim/vm1/vda.qcow2", "/var/lib/sim/vm1/vdb.qcow2"} <= reads
        # a refusal leaves no job behind
        before = len(await dom.list_jobs())
        with pytest.raises(AccessDenied, match=re.escape("refused /backups/vdb.qcow2")):
            dom.path_guard = Recorder(refuse="/backups/vdb.qcow2")
            await dom.job_begin(BACKUP)
        assert len(await dom.list_jobs()) == before
        # the legacy entry points go through it too
        with pytest.raises(AccessDenied, match=re.escape("refused /var/lib/sim/vm1/vda.1.qcow2")):
            dom.path_guard = Recorder(refuse="/var/lib/sim/vm1/vda.1.qcow2")
            await dom.block_pull("vda")
        with pytest.raises(AccessDenied, match=re.escape("refused /var/lib/sim/vm1/vda.2.qcow2")):
            dom.path_guard = Recorder(refuse="/var/lib/sim/vm1/vda.2.qcow2")
            await dom.block_commit("vda", None, "/var/lib/sim/vm1/vda.1.qcow2")
        with pytest.raises(AccessDenied, match="refused /x/t"):
            dom.path_guard = Recorder(refuse="/x/t")
            await dom.backup_begin(
                "<domainbackup><disks><disk name='vda'><target file='/x/t'/></disk></disks>"
                "</domainbackup>"
            )
        # a pull backup's scratch file and NBD socket; a migration's layers
        seen = dom.path_guard = Recorder(refuse="/run/u/nbd.sock")
        with pytest.raises(AccessDenied, match=re.escape("refused /run/u/nbd.sock")):
            await dom.job_begin(
                "<job type='backup'><domainbackup mode='pull'>"
                "<server transport='unix' socket='/run/u/nbd.sock'/><disks><disk name='vda'>"
                "<scratch file='/run/u/vda.scratch'/></disk></disks></domainbackup></job>"
            )
        kinds = {u.path: (u.access, u.kind, u.what) for u in seen.uses}
        assert kinds["/run/u/vda.scratch"] == (
            Access.WRITE,
            PathKind.FILE,
            "scratch file of disk 'vda'",
        )
        assert kinds["/run/u/nbd.sock"][:2] == (Access.WRITE, PathKind.SOCKET)
        dom.path_guard = Recorder(refuse="/var/lib/sim/vm1/vdb.qcow2")
        with pytest.raises(AccessDenied, match=re.escape("refused /var/lib/sim/vm1/vdb.qcow2")):
            await dom.job_begin("<job type='migration'><destination uri='sim:///elsewhere'/></job>")
        assert len(await dom.list_jobs()) == before


@pytest.mark.anyio
async def test_type_that_lists_no_paths_is_refused_a_guard() -> None:
    info = registry.get("backup")
    registry.register(attrs.evolve(info, paths=None), replace=True)
    try:
        async with jobcore.connect("sim:///guard2?rate=0") as conn:
            dom = await as_local(conn).lookup_domain("vm1")
            with pytest.raises(AccessDenied, match="does not list the files it touches"):
                dom.path_guard = Recorder()
                await dom.job_begin_spec(BackupJobSpec())
            dom.path_guard = None
            await (await dom.job_begin_spec(BackupJobSpec())).wait(10)  # unguarded: fine
    finally:
        registry.register(info, replace=True)


class NoGuardDriver:
    uri = "fake:///x"

    async def create_domain(self, xml: str) -> Any:
        raise AssertionError("a driver that takes no guard must not be called with one")


@pytest.mark.anyio
async def test_driver_that_takes_no_guard_is_refused_one() -> None:
    conn = LocalConnection("fake:///x", NoGuardDriver(), None)  # type: ignore[arg-type]
    with pytest.raises(AccessDenied, match="cannot check the files a domain definition names"):
        await conn.create_domain("<domain/>", path_guard=Recorder())


# ---- through jobd, as another uid ------------------------------------------------------


class Session(RawClient):
    """A raw protocol session; ``call`` returns ``[kind, result-or-error-name, text]``."""

    hello: list[Any]  # always sent

    def __init__(self, path: Path, uri: str) -> None:
        super().__init__(path, uri, timeout=60)

    def call(self, method: str, *args: object) -> list[Any]:
        msg = super().call(method, *args)
        return [msg[0], msg[2], msg[3] if msg[0] == 2 else None]


def as_user(uid: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` in a forked child running as ``uid`` (no exec: the venv's python lies
    under /root); its JSON result, or the child's exception re-raised as text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = {"ok": fn()}
        except BaseException as exc:  # reported to the parent
            out = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(w, json.dumps(out, default=str).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks) or b'{"error": "child died"}')
    if "error" in out:
        raise AssertionError(f"child as uid {uid} failed: {out['error']}")
    return out["ok"]


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """A world-traversable base: jobd's run dir, a dir of uid OTHER, a root-only dir."""
    base = Path(tempfile.mkdtemp(prefix="jobcore-guard-"))
    try:
        base.chmod(0o711)
        run = base / "run"
        run.mkdir(mode=0o711)
        xdg = base / "xdg"  # the qemu driver's default run directory goes here
        xdg.mkdir(mode=0o700)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
        mine = base / "user"
        mine.mkdir(mode=0o700)
        os.chown(mine, OTHER, OTHER)
        private = base / "root-only"
        private.mkdir(mode=0o700)
        yield {"base": base, "run": run, "user": mine, "root": private}
    finally:
        for path in sorted(base.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        base.rmdir()


def _user_image(path: Path, backing: Path | None = None) -> Path:
    create(path, "16M", backing)
    os.chown(path, OTHER, OTHER)
    return path


def _backup(target: Path | None) -> str:
    store = "" if target is None else f"<target file='{target}'/>"
    return (
        "<job type='backup'><domainbackup><disks>"
        f"<disk name='vda' type='file'>{store}<driver type='qcow2'/></disk>"
        "</disks></domainbackup></job>"
    )


@needs_root
def test_foreign_uid_cannot_reach_root_files_through_jobd(world: dict[str, Path]) -> None:
    user, private, run = world["user"], world["root"], world["run"]
    secret = private / "secret.qcow2"
    create(secret, "16M")
    secret.chmod(0o600)
    root_file = private / "existing.qcow2"
    create(root_file, "16M")
    own = _user_image(user / "own.qcow2")
    chained = _user_image(user / "top.qcow2", backing=secret)  # its base is root's
    config = world["base"] / "jobd.toml"
    config.write_text(
        f"allowed_uids = [0, {OTHER}]\n"
        'allowed_uris = ["qemu:///session", "qemu:///session?dir=*"]\n'
    )
    jobd = Jobd(run, "--config", str(config)).wait_ready()
    sock = jobd.sock

    def attempt() -> dict[str, Any]:
        s = Session(sock, "qemu:///session")
        out: dict[str, Any] = {"hello": s.hello}
        out["dir"] = Session(sock, f"qemu:///session?dir={user}/qemu").hello
        out["secret"] = s.call("create_domain", domain_xml("steal", {"vda": secret}))
        out["chain"] = s.call("create_domain", domain_xml("chain", {"vda": chained}))
        out["own"] = s.call("create_domain", domain_xml("own", {"vda": own}))
        out["planted"] = s.call("job_begin", "own", _backup(private / "planted.qcow2"), 0)
        out["overwrite"] = s.call("job_begin", "own", _backup(root_file), 1)  # REUSE_EXTERNAL
        out["run"] = s.call("job_begin", "own", _backup(run / "planted.qcow2"), 0)
        legacy = (
            "<domainbackup><disks><disk name='vda'>"
            f"<target file='{private}/legacy.qcow2'/></disk></disks></domainbackup>"
        )
        out["legacy"] = s.call("backup_begin", "own", legacy, None, 0)
        began = s.call("job_begin", "own", _backup(user / "mine.qcow2"), 0)
        out["mine"] = s.call("job_wait", began[1][0], 60.0)[1][3]
        began = s.call("job_begin", "own", _backup(None), 0)  # default: next to its image
        out["default"] = s.call("job_wait", began[1][0], 60.0)[1][3]
        # HMP/QMP could open root's files as jobd's uid: refused to a confined client
        out["monitor"] = s.call("qemu_monitor_command", "own", "info block", 1)
        out["qmp"] = s.call("qemu_monitor_command", "own", '{"execute": "query-status"}', 0)
        s.call("domain_destroy", "own")
        return out

    try:
        out = as_user(OTHER, attempt)
        assert out["hello"][0] == 1
        assert out["dir"][:2] == [2, "AccessDenied"] and "may not choose" in out["dir"][2]
        assert out["secret"][:2] == [2, "AccessDenied"]
        for key in ("monitor", "qmp"):
            assert out[key][:2] == [2, "AccessDenied"] and "jobd's own uid" in out[key][2]
        assert f"source of disk 'vda' '{secret}'" in out["secret"][2]
        assert "is owned by uid 0" in out["secret"][2]
        assert out["chain"][:2] == [2, "AccessDenied"]
        assert f"backing file 1 of disk 'vda' '{secret}'" in out["chain"][2]
        assert out["own"][0] == 1
        for key, path in (
            ("planted", private / "planted.qcow2"),
            ("overwrite", root_file),
            ("run", run / "planted.qcow2"),  # jobd's own run directory
            ("legacy", private / "legacy.qcow2"),
        ):
            assert out[key][:2] == [2, "AccessDenied"], (key, out[key])
            assert f"target of disk 'vda' '{path}'" in out[key][2], out[key][2]
        assert not (private / "planted.qcow2").exists()
        assert not (private / "legacy.qcow2").exists()
        assert not (run / "planted.qcow2").exists()
        assert out["mine"] == "completed" and (user / "mine.qcow2").exists()
        assert out["default"] == "completed"
        assert [p.name for p in user.glob("own.qcow2.*")]  # the derived default target
        # jobd's own uid (root here) is not confined
        s = Session(sock, "qemu:///session")
        assert s.call("create_domain", domain_xml("root-dom", {"vda": secret}))[0] == 1
        s.call("domain_destroy", "root-dom")
    finally:
        assert jobd.stop() == 0
