"""Private run directories (jobcore.rundir), as jobd and the qemu driver use them.

A run directory another user could change (pre-created by them, writable by others, or a
symbolic link) is refused with a message saying why and what to do; a missing one is
created 0700.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jobcore.filelock import FileLock, LockHeld
from jobcore.rundir import UnsafeRunDir, ensure_private_dir

ROOT = Path(__file__).resolve().parent.parent
OTHER_UID = 12345


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_missing_directory_and_parents_are_created_0700(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask gets 0700
    try:
        made = ensure_private_dir(tmp_path / "a" / "b" / "run")
    finally:
        os.umask(old)
    assert made == tmp_path / "a" / "b" / "run"
    for path in (tmp_path / "a", tmp_path / "a" / "b", made):
        assert path.is_dir() and mode(path) == 0o700
    # an existing private directory is accepted as it is
    assert ensure_private_dir(made) == made


@pytest.mark.parametrize(
    ("bits", "who"), [(0o777, "group and others"), (0o702, "others"), (0o720, "group")]
)
def test_writable_by_others_is_refused(tmp_path: Path, bits: int, who: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(bits)
    with pytest.raises(UnsafeRunDir, match=f"writable by {who} .*chmod 700 {run}"):
        ensure_private_dir(run)


def test_symlink_is_refused_even_to_a_private_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UnsafeRunDir, match=f"{link} is a symbolic link .*{real}"):
        ensure_private_dir(link)


def test_inside_a_world_writable_non_sticky_parent_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may rename entries here: our run dir could be swapped
    with pytest.raises(UnsafeRunDir, match=f"inside {shared}, which everyone may write"):
        ensure_private_dir(shared / "run")
    assert not (shared / "run").exists()  # refused before anything was created there
    shared.chmod(0o1777)  # sticky, like /tmp: only the owner may rename its entries
    assert mode(ensure_private_dir(shared / "run")) == 0o700


def test_inside_a_group_writable_non_sticky_parent_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "team"
    shared.mkdir()
    shared.chmod(0o770)  # the group may rename entries here
    with pytest.raises(UnsafeRunDir, match=f"inside {shared}, which its group may write"):
        ensure_private_dir(shared / "run")
    assert not (shared / "run").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another uid needs root")
def test_inside_a_parent_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, 12345, 12345)  # its owner may rename the run dir away at any time
    with pytest.raises(UnsafeRunDir, match=f"inside {parent}, which belongs to uid 12345"):
        ensure_private_dir(parent / "run")
    (parent / "run").mkdir(mode=0o700)  # pre-made: refused all the same
    with pytest.raises(UnsafeRunDir, match="belongs to uid 12345"):
        ensure_private_dir(parent / "run")


def test_not_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("x")
    with pytest.raises(UnsafeRunDir, match="not a directory"):
        ensure_private_dir(tmp_path / "run")


def test_directory_of_another_uid_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)  # we are "someone else"
    with pytest.raises(UnsafeRunDir, match=f"owned by uid {real_uid}, not by you"):
        ensure_private_dir(run)


def jobd(
    run_dir: Path | None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "jobcore.daemon"]
    if run_dir is not None:
        args += ["--run-dir", str(run_dir)]
    # a refused run directory makes jobd exit at once; before the fix it served (timeout)
    return subprocess.run(
        args, capture_output=True, text=True, timeout=20, cwd=ROOT, env=env, check=False
    )


def test_jobd_refuses_unsafe_run_directories(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    res = jobd(open_dir)
    assert res.returncode != 0
    assert "writable by group and others" in res.stderr and "chmod 700" in res.stderr
    assert not (open_dir / "jobd.sock").exists()

    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    res = jobd(tmp_path / "link")
    assert res.returncode != 0 and "symbolic link" in res.stderr
    assert not (real / "jobd.sock").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
def test_jobd_refuses_a_run_directory_another_user_created(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    res = jobd(theirs)
    assert res.returncode != 0
    assert f"owned by uid {OTHER_UID}, not by you" in res.stderr


def test_jobd_refuses_a_pre_created_tmp_fallback(tmp_path: Path) -> None:
    """``/tmp/jobcore-UID`` (no XDG_RUNTIME_DIR) made by someone else, world-writable."""
    fallback = tmp_path / f"jobcore-{os.getuid()}"
    fallback.mkdir()
    fallback.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(tmp_path)
    res = jobd(None, env)
    assert res.returncode != 0
    assert str(fallback) in res.stderr and "writable by group and others" in res.stderr


# ---- one rule for default run directories ----------------------------------------------


@pytest.mark.parametrize("xdg", ["", "missing", "a-file"])
def test_default_run_dirs_fall_back_to_tmp_unless_xdg_runtime_dir_is_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xdg: str
) -> None:
    """jobd's default (jobctl's too) and the qemu driver's follow one rule: an unset,
    missing or non-directory (or unwritable) XDG_RUNTIME_DIR means ``TMPDIR/NAME-UID``."""
    from drivers.qemu.rundir import default_run_dir as qemu_default
    from jobcore.protocol import default_run_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / xdg) if xdg else "")
    uid = os.getuid()
    assert default_run_dir() == tmp_path / f"jobcore-{uid}"
    assert qemu_default() == tmp_path / f"jobcore-qemu-{uid}"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert (default_run_dir(), qemu_default()) == (tmp_path / "jobcore", tmp_path / "jobcore-qemu")


# ---- one file lock (jobd.pid, jobcore-qemu.lock, the store's PATH.lock) ------------------


def test_file_lock_has_one_owner_and_names_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    first, second = FileLock(path), FileLock(path)
    first.acquire()
    first.write("4242\nmore\n")
    with pytest.raises(LockHeld) as held:
        second.acquire()
    assert held.value.holder == "4242" and held.value.path == path
    assert mode(path) == 0o600
    first.release()
    second.acquire()  # free again once released
    assert path.read_text() == "4242\nmore\n"  # content stays for the next owner
    second.release(remove=True)
    assert not path.exists()
    second.release()  # not held: nothing happens


def test_file_lock_is_dropped_when_its_owner_dies(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    code = (
        "import sys, time; from pathlib import Path; from jobcore.filelock import FileLock; "
        "FileLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
        with pytest.raises(LockHeld):
            FileLock(path).acquire()
    finally:
        proc.kill()
        proc.wait()
    lock = FileLock(path)
    lock.acquire()
    lock.release()


def test_file_lock_follows_a_symbolic_link_only_when_told(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError) as refused:
        FileLock(tmp_path / "link").acquire()
    assert refused.value.errno == errno.ELOOP
    lock = FileLock(tmp_path / "link", follow_symlinks=True)
    lock.acquire()
    with pytest.raises(LockHeld):  # the link and its target are one lock
        FileLock(tmp_path / "real").acquire()
    lock.release()
