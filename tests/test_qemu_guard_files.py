"""Second red team, H-A and H-B: what the qemu driver removes, creates and lets QEMU open
for a confined client (design/daemon.md, "Access model"; design/qemu.md).

- H-B: files the driver created (targets, scratch) and committed layers (``<delete/>``)
  are removed only while their path still names the same inode in the same directory: a
  directory swapped for a symbolic link to another one is not followed. ``qemu-img
  create`` writes the file the driver claimed, not whatever the path names later.
- H-A: a qcow2 whose header names an external data file is refused wherever QEMU would
  open it: a reused target or scratch, and a header rewritten after the driver read it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jobd_helpers import Jobd
from qemu_helpers import create, domain_xml, make_job, run, write
from test_path_guard import OTHER, Session, as_user, needs_root
from test_qemu_backup_hardening import pull, push
from test_qemu_driver import session

import drivers.qemu.connection as qconn
import drivers.qemu.images as images
import drivers.qemu.runners.backup as qbackup
import jobcore
from jobcore import VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL, JobState
from jobcore.errors import DriverError, InvalidArgument
from jobcore.spec import ChainRef
from jobcore.types.chain import BlockCommitSpec
from jobcore.xml.domain import parse_domain

REUSE = VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the driver's file handling does not depend on the event loop


def swap_for_link(directory: Path, to: Path) -> Path:
    """Rename ``directory`` away and put a symbolic link to ``to`` in its place."""
    moved = directory.with_name(directory.name + ".old")
    directory.rename(moved)
    directory.symlink_to(to)
    return moved


async def test_abort_after_a_directory_swap_deletes_nothing_through_the_link(
    tmp_path: Path,
) -> None:
    src = create(tmp_path / "src.qcow2", "16M")
    scratch_dir = tmp_path / "d"
    scratch_dir.mkdir()
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "sc.qcow2"
    victim.write_text("someone else's file\n")
    async with jobcore.connect(f"qemu:///session?dir={tmp_path / 'run'}") as conn:
        dom = await conn.create_domain(domain_xml("vm1", {"vda": src}))
        job = await dom.job_begin(pull("vda", scratch_dir / "sc.qcow2", tmp_path / "s.sock"))
        moved = swap_for_link(scratch_dir, victim_dir)
        await job.abort()  # a pull backup's abort is its end: completed
        assert (await job.wait(30)).state is JobState.COMPLETED
        assert victim.read_text() == "someone else's file\n"
        # the job's own scratch, renamed away with its directory, is not chased either
        assert (moved / "sc.qcow2").exists()
        # put back where it was created, it is the job's: a second job's cleanup of the
        # same kind removes its own file, found at its path in its directory
        scratch_dir.unlink()
        moved.rename(scratch_dir)
        job = await dom.job_begin(pull("vda", scratch_dir / "sc2.qcow2", tmp_path / "s.sock"))
        await job.abort()  # a pull backup's abort is its end: completed
        assert (await job.wait(30)).state is JobState.COMPLETED
        assert not (scratch_dir / "sc2.qcow2").exists()
        await dom.destroy()


async def test_remove_created_checks_directory_and_file_inode(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    created = await images.create_new_image(str(d / "t.qcow2"), "qcow2", 1 << 20)
    assert created is not None
    (other / "t.qcow2").write_text("keep")
    moved = swap_for_link(d, other)
    assert images.remove_created([created]) == [str(d / "t.qcow2")]
    assert (other / "t.qcow2").read_text() == "keep" and (moved / "t.qcow2").exists()
    d.unlink()
    moved.rename(d)
    # same directory, but the name now is a symbolic link to the other file
    (d / "t.qcow2").rename(d / "mine.qcow2")
    (d / "t.qcow2").symlink_to(other / "t.qcow2")
    assert images.remove_created([created]) == [str(d / "t.qcow2")]
    assert (other / "t.qcow2").read_text() == "keep" and (d / "t.qcow2").is_symlink()
    (d / "t.qcow2").unlink()
    (d / "mine.qcow2").rename(d / "t.qcow2")
    assert images.remove_created([created]) == []  # still the same file: removed
    assert not (d / "t.qcow2").exists()


async def test_block_commit_delete_does_not_follow_a_swapped_directory(
    tmp_path: Path,
) -> None:
    layers = tmp_path / "layers"
    layers.mkdir()
    base = create(layers / "base.qcow2", "16M")
    mid = create(layers / "mid.qcow2", "16M", backing=base)
    top = create(layers / "top.qcow2", "16M", backing=mid)
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "mid.qcow2"
    victim.write_text("someone else's file\n")
    # QEMU reopens the base read-write by its name: the same inode is found through the link
    os.link(base, victim_dir / "base.qcow2")
    async with session(tmp_path) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": top})))
        moved = swap_for_link(layers, victim_dir)  # QEMU keeps the layers it opened
        spec = BlockCommitSpec("vda", top=ChainRef(index=1), base=ChainRef(index=2), delete=True)
        job, rep = await make_job(conn, "vm1", spec)
        await conn.start(job)
        assert (await rep.wait_end())[0] == "completed"
        assert victim.read_text() == "someone else's file\n"
        assert (moved / "mid.qcow2").exists()  # not chased to its new place either


async def test_qemu_img_create_writes_the_claimed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "d"
    d.mkdir()
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    real = images.create_image
    moved: list[Path] = []

    async def swap_then_create(path: str, fmt: str, size: int) -> None:
        moved.append(swap_for_link(d, victim_dir))  # the window after the claim
        await real(path, fmt, size)

    monkeypatch.setattr(images, "create_image", swap_then_create)
    created = await images.create_new_image(str(d / "t.qcow2"), "qcow2", 1 << 20)
    assert created is not None
    assert list(victim_dir.iterdir()) == []  # qemu-img wrote nothing through the link
    assert "file format: qcow2" in run("qemu-img", "info", str(moved[0] / "t.qcow2"))


async def test_target_swapped_before_qemu_opens_it_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = create(tmp_path / "src.qcow2", "16M")
    write(src, "write -P 0x5a 0 1M")
    d = tmp_path / "d"
    d.mkdir()
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = create(victim_dir / "t.qcow2", "16M")  # someone else's image, same name
    before = victim.read_bytes()
    real = images.create_new_image

    async def create_then_swap(path: str, fmt: str, size: int) -> Any:
        created = await real(path, fmt, size)
        swap_for_link(d, victim_dir)  # before the driver's blockdev-add opens the path
        return created

    monkeypatch.setattr(qbackup, "create_new_image", create_then_swap)
    async with jobcore.connect(f"qemu:///session?dir={tmp_path / 'run'}") as conn:
        dom = await conn.create_domain(domain_xml("vm1", {"vda": src}))
        with pytest.raises(DriverError, match="changed while the backup started"):
            job = await dom.job_begin(push("vda", d / "t.qcow2"))
            await job.wait(30)
        await dom.destroy()
    assert victim.read_bytes() == before
    assert (tmp_path / "d.old" / "t.qcow2").exists()


def _data_file_image(path: Path, data_file: Path, size: str = "16M") -> Path:
    """A qcow2 whose header names ``data_file`` (raw), which already holds data."""
    fake = path.with_name(path.name + ".data")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"data_file={fake},data_file_raw=on", str(path), size)  # fmt: skip
    run("qemu-img", "amend", "-f", "qcow2", "-o", f"data_file={data_file}", str(path))
    fake.unlink()
    return path


async def test_reused_target_or_scratch_with_a_data_file_is_refused(
    tmp_path: Path,
) -> None:
    src = create(tmp_path / "src.qcow2", "16M")
    write(src, "write -P 0x5a 0 1M")
    victim = tmp_path / "victim.raw"
    victim.write_bytes(b"V" * (16 << 20))
    target = _data_file_image(tmp_path / "target.qcow2", victim)
    async with jobcore.connect(f"qemu:///session?dir={tmp_path / 'run'}") as conn:
        dom = await conn.create_domain(domain_xml("vm1", {"vda": src}))
        for xml in (push("vda", target), pull("vda", target, tmp_path / "s.sock")):
            with pytest.raises(InvalidArgument, match="external file"):
                await dom.job_begin(xml, REUSE)
        await dom.destroy()
    assert victim.read_bytes() == b"V" * (16 << 20)


async def test_header_rewritten_after_the_check_is_closed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = create(tmp_path / "disk.qcow2", "16M")
    victim = tmp_path / "victim.raw"
    victim.write_bytes(b"V" * (16 << 20))
    real = images.backing_chain

    async def chain_then_rewrite(path: str, fmt: str) -> list[images.ImageInfo]:
        chain = await real(path, fmt)
        # the image's owner swaps in a header naming a data file once it was read
        swapped = _data_file_image(tmp_path / "evil.qcow2", victim)
        os.replace(swapped, image)
        return chain

    monkeypatch.setattr(qconn, "backing_chain", chain_then_rewrite)
    async with jobcore.connect(f"qemu:///session?dir={tmp_path / 'run'}") as conn:
        with pytest.raises(DriverError, match="external file its header names"):
            await conn.create_domain(domain_xml("vm1", {"vda": image}))
        assert await conn.list_domains() == []
    assert victim.read_bytes() == b"V" * (16 << 20)


# ---- through jobd, as a confined uid ----------------------------------------------------


@pytest.fixture
def world() -> Iterator[dict[str, Path]]:
    """A world-traversable base: jobd's run dir, a dir of uid OTHER, a root-only dir."""
    base = Path(tempfile.mkdtemp(prefix="jobcore-guard2-"))
    try:
        base.chmod(0o711)
        run_dir = base / "run"
        run_dir.mkdir(mode=0o711)
        mine = base / "user"
        mine.mkdir(mode=0o700)
        os.chown(mine, OTHER, OTHER)
        private = base / "root-only"
        private.mkdir(mode=0o700)
        yield {"base": base, "run": run_dir, "user": mine, "root": private}
    finally:
        run("rm", "-rf", str(base))


@needs_root
def test_confined_client_cannot_make_jobd_delete_or_read_root_files(
    world: dict[str, Path],
) -> None:
    user, private, run_dir = world["user"], world["root"], world["run"]
    victim = private / "sc.qcow2"
    victim.write_text("root's file\n")
    victim.chmod(0o600)
    secret = private / "secret.raw"
    secret.write_bytes(b"S" * (16 << 20))
    secret.chmod(0o600)
    disk = create(user / "disk.qcow2", "16M")
    os.chown(disk, OTHER, OTHER)
    (user / "d").mkdir(mode=0o700)
    os.chown(user / "d", OTHER, OTHER)
    reused = _data_file_image(user / "reused.qcow2", secret)  # made by root for the test
    os.chown(reused, OTHER, OTHER)
    config = world["base"] / "jobd.toml"
    config.write_text(f'allowed_uids = [0, {OTHER}]\nallowed_uris = ["qemu:///session?dir=*"]\n')
    uri = f"qemu:///session?dir={world['base'] / 'qemu'}"
    jobd = Jobd(run_dir, "--config", str(config)).wait_ready()
    opener = Session(jobd.sock, uri)  # jobd's own user opens the connection; the client attaches
    assert opener.hello[0] == 1, opener.hello

    def attempt() -> dict[str, Any]:
        s = Session(jobd.sock, uri)
        out: dict[str, Any] = {"dom": s.call("create_domain", domain_xml("vm", {"vda": disk}))}
        began = s.call("job_begin", "vm", pull("vda", user / "d" / "sc.qcow2", user / "s.sock"), 0)
        out["began"] = began[:2]
        os.rename(user / "d", user / "d.old")
        os.symlink(private, user / "d")
        out["abort"] = s.call("job_abort", began[1][0])[:2]
        out["state"] = s.call("job_wait", began[1][0], 30.0)[1][3]
        out["reuse"] = s.call("job_begin", "vm", push("vda", reused), REUSE)
        s.call("domain_destroy", "vm")
        return out

    try:
        out = as_user(OTHER, attempt)
        assert out["dom"][0] == 1 and out["began"][0] == 1, out
        assert out["state"] == "completed", out  # a pull backup ends by abort
        assert victim.read_text() == "root's file\n"
        assert (user / "d.old" / "sc.qcow2").exists()
        assert out["reuse"][0] == 2 and "external file" in out["reuse"][2], out["reuse"]
        assert secret.read_bytes() == b"S" * (16 << 20)
    finally:
        assert jobd.stop() == 0
