"""qemu-img helpers: read backing chains and create target/scratch images.

Every ``qemu-img`` run has a time limit (``QEMU_IMG_TIMEOUT``, whatever the URI says): one
that does not finish is killed and is a DriverError. Backing chains are read one layer at a
time (``qemu-img info`` never opens a backing file by itself without ``--backing-chain``),
so a backing file string in an image header is checked before anything opens it: it must
name a local regular file (relative names are resolved against the image's directory);
protocol names (``nbd://…``, ``json:{…}``, any ``scheme:`` prefix) are refused, and so is a
qcow2 layer with an external data file (QEMU would open the name its header holds).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
from attrs import frozen

from jobcore.errors import DriverError

QEMU_IMG = "qemu-img"
#: seconds one qemu-img run may take before it is killed (a constant, not a URI parameter)
QEMU_IMG_TIMEOUT = 60.0
#: the longest backing chain the driver opens (layers, the active one included)
MAX_CHAIN = 64
#: the formats a chain layer may have: the driver opens each layer itself (``backing``
#: names the node below), which it does for these formats only
LAYER_FORMATS = frozenset({"qcow2", "raw"})


@frozen
class ImageInfo:
    filename: str
    format: str
    virtual_size: int


def qemu_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise DriverError(f"{name} not found: install qemu-system-x86 and qemu-utils")
    return path


class QemuImgFailed(DriverError):
    """``qemu-img`` exited non-zero; ``stderr`` is its text."""

    def __init__(self, command: str, stderr: str) -> None:
        self.stderr = stderr
        super().__init__(f"qemu-img {command} failed: {stderr}")


async def _run(*args: str) -> str:
    argv = [qemu_binary(QEMU_IMG), *args]
    with anyio.move_on_after(QEMU_IMG_TIMEOUT) as scope:
        # cancelled (timeout or caller), anyio kills and reaps the process
        result = await anyio.run_process(argv, check=False, stdin=subprocess.DEVNULL)
    if scope.cancelled_caught:
        raise DriverError(
            f"'qemu-img {' '.join(args)}' did not finish within {QEMU_IMG_TIMEOUT:g} s "
            "and was killed: check that the file is a readable regular file on a storage "
            "that answers"
        )
    if result.returncode != 0:
        raise QemuImgFailed(args[0], result.stderr.decode(errors="replace").strip())
    return result.stdout.decode()


def unreadable_image(path: str, fmt: str, qemu_img_text: str) -> str:
    """What to tell the user when ``qemu-img info`` cannot open a disk's image."""
    text = qemu_img_text.removeprefix("qemu-img: ")
    named = set(re.findall(r"'([^']+)'", text))
    if "backing" in text or named - {path}:  # qemu-img names the layer it failed on
        return (
            f"the backing chain of image '{path}' cannot be opened ({text}): check that "
            f"every backing file exists, with 'qemu-img info --backing-chain {path}'"
        )
    if "No such file" in text or "Permission denied" in text:
        return f"cannot read image '{path}' ({text})"
    return (
        f"image '{path}' is not a valid {fmt} image ({text}): check it with "
        f"'qemu-img check -f {fmt} {path}', or give its real format in <driver type=...>"
    )


def regular_file(path: str, what: str) -> None:
    """Refuse anything but an existing regular file (after symlinks): a FIFO would block
    whoever opens it, a device or directory is no ``<disk type='file'>`` image."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DriverError(f"cannot read {what} '{path}' ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a block device"
            if stat.S_ISBLK(st.st_mode)
            else "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "not a regular file"
        )
        raise DriverError(
            f"{what} '{path}' is {kind}: a file disk's image must be a regular file "
            "(block devices are not supported)"
        )


#: QEMU takes a name with ':' before any '/' as ``protocol:rest`` (``nbd:``, ``json:``…)
_PROTOCOL = re.compile(r"^[^/]*:")


def _backing_of(layer: str, data: dict[str, Any]) -> tuple[str, str | None] | None:
    """The local file (and recorded format) a layer's header names as its backing file."""
    name = data.get("backing-filename")
    if name is None:
        return None
    name = str(name)
    if _PROTOCOL.match(name):
        raise DriverError(
            f"image '{layer}' names backing file '{name}', a protocol name, not a local "
            "file: the qemu driver opens local backing files only (rebase the image onto a "
            "local file with 'qemu-img rebase -u -b FILE')"
        )
    path = name if name.startswith("/") else os.path.join(os.path.dirname(layer), name)
    fmt = data.get("backing-filename-format")
    return path, (str(fmt) if fmt is not None else None)


def data_file_of(data: dict[str, Any]) -> str | None:
    """The external data file a qcow2's ``qemu-img info`` (or QMP ImageInfo) names."""
    specific = data.get("format-specific")
    extra = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(extra, dict) and extra.get("data-file") is not None:
        return str(extra["data-file"])
    return None


def refuse_data_file(data: dict[str, Any], what: str) -> None:
    """Refuse a qcow2 whose header names an external data file: QEMU would open the file
    (or URL) the header names, which no guard has checked."""
    name = data_file_of(data)
    if name is not None:
        raise DriverError(
            f"{what} keeps its data in an external file ('{name}'): the qemu driver does not "
            "open qcow2 data files"
        )


async def _layer_info(path: str, fmt: str | None, top: str) -> dict[str, Any]:
    """``qemu-img info`` of one layer: it reads that file's header only."""
    args = ["info", "-U", "--output=json"] + (["-f", fmt] if fmt else []) + [path]
    try:
        out = await _run(*args)
    except QemuImgFailed as exc:
        if path == top:
            raise DriverError(unreadable_image(path, fmt or "qcow2", exc.stderr)) from None
        raise DriverError(
            f"the backing chain of image '{top}' cannot be opened (layer '{path}': "
            f"{exc.stderr.removeprefix('qemu-img: ')}): check it with 'qemu-img info {path}'"
        ) from None
    data: Any = json.loads(out)
    if not isinstance(data, dict):
        raise DriverError(f"qemu-img info '{path}': unexpected output")
    return data


def _check_layer(top: str, current: str, chain: list[ImageInfo], seen: set[str]) -> None:
    """Local checks before qemu-img opens a layer (a few stat calls)."""
    if not chain:
        regular_file(current, "image")
    else:
        try:
            regular_file(current, "backing file")
        except DriverError as exc:
            raise DriverError(
                f"the backing chain of image '{top}' cannot be opened ({exc}): check that "
                f"every backing file exists, with 'qemu-img info {chain[-1].filename}'"
            ) from None
    real = os.path.realpath(current)
    if real in seen:
        raise DriverError(f"the backing chain of image '{top}' loops at '{current}'")
    seen.add(real)
    if len(chain) == MAX_CHAIN:
        raise DriverError(f"the backing chain of image '{top}' is longer than {MAX_CHAIN} layers")


async def backing_chain(path: str, fmt: str) -> list[ImageInfo]:
    """The image's chain, active layer first, read one layer at a time: each backing file
    is checked (a local regular file, no protocol, no loop, at most MAX_CHAIN layers)
    before qemu-img opens it."""
    chain: list[ImageInfo] = []
    seen: set[str] = set()
    current: str = path
    cur_fmt: str | None = fmt
    while True:
        _check_layer(path, current, chain, seen)
        data = await _layer_info(current, cur_fmt, path)
        layer_fmt = str(data["format"])
        if layer_fmt not in LAYER_FORMATS:
            raise DriverError(
                f"layer '{current}' of image '{path}' is a {layer_fmt} image: the qemu "
                f"driver opens {' and '.join(sorted(LAYER_FORMATS))} layers only"
            )
        refuse_data_file(data, f"layer '{current}' of image '{path}'")
        chain.append(ImageInfo(current, layer_fmt, int(data["virtual-size"])))
        below = _backing_of(current, data)
        if below is None:
            return chain
        current, cur_fmt = below


async def image_info(path: str) -> ImageInfo:
    """One image's format (probed) and virtual size, read-only (``qemu-img info -U``)."""
    regular_file(path, "image")
    data: Any = json.loads(await _run("info", "-U", "--output=json", path))
    refuse_data_file(data, f"image '{path}'")
    return ImageInfo(
        filename=str(data["filename"]),
        format=str(data["format"]),
        virtual_size=int(data["virtual-size"]),
    )


async def create_image(path: str, fmt: str, size: int) -> None:
    await _run("create", "-q", "-f", fmt, path, str(size))


@frozen
class OwnedFile:
    """A file the driver may remove (one it created, or a layer it opened): its path, and
    the (st_dev, st_ino) of the file and of its directory then, so that removing it never
    follows a directory that was swapped (for a symbolic link, another directory) since."""

    path: str
    ident: tuple[int, int]
    dir_ident: tuple[int, int]


def _ident(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def claimed_file(path: str) -> OwnedFile | None:
    """The file a process that died while it created ``path`` left: an empty regular file
    of this user (``create_new_image`` claims the name with ``O_EXCL`` and records it
    before writing anything), else None (nothing, or not a file it could have left)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size or st.st_uid != os.getuid():
        return None
    return owned_file(path)


def owned_file(path: str) -> OwnedFile | None:
    """``path``'s file (lstat: a symbolic link is itself) and directory as they are now;
    None when either cannot be examined."""
    try:
        st = os.lstat(path)
        dir_st = os.stat(os.path.dirname(path) or ".")
    except OSError:
        return None
    return OwnedFile(path, _ident(st), _ident(dir_st))


def file_ident(path: str, disk: str) -> tuple[int, int]:
    """(st_dev, st_ino) of an existing store (symbolic links followed, as QEMU does)."""
    try:
        return _ident(os.stat(path))
    except OSError as exc:
        raise DriverError(
            f"store '{path}' for backup of '{disk}' cannot be examined ({exc.strerror or exc})"
        ) from None


def holds_inode(pid: int, ident: tuple[int, int]) -> bool:
    """Whether process ``pid`` (a QEMU of ours) has the file ``ident`` open."""
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return False
    for name in names:
        try:
            if _ident(os.stat(os.path.join(fds, name))) == ident:
                return True
        except OSError:
            continue
    return False


def _open_dir(path: str) -> int:
    return os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


async def create_new_image(
    path: str, fmt: str, size: int, claimed: Callable[[OwnedFile], Awaitable[None]] | None = None
) -> OwnedFile | None:
    """Create an image at ``path`` only if nothing is there (not even a dangling symlink):
    the name is claimed with O_EXCL first, in the directory opened once, so an existing
    file is never opened for writing; qemu-img then writes the claimed file through
    ``/proc/<pid>/fd/<fd>`` (the same inode, whatever happens to the path meanwhile).
    ``claimed`` is called with the file as soon as it exists (before qemu-img runs: a
    caller records it, so that a process killed meanwhile left a file it knows of).
    None when something exists; on failure nothing is left behind."""
    try:
        dir_fd = _open_dir(path)
    except OSError as exc:
        raise DriverError(
            f"cannot create backup file '{path}': {exc.strerror or exc}; "
            "check that its directory exists and is writable"
        ) from None
    try:
        name = os.path.basename(path)
        try:
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=dir_fd,
            )
        except FileExistsError:
            return None
        except OSError as exc:
            raise DriverError(
                f"cannot create backup file '{path}': {exc.strerror or exc}; "
                "check that its directory exists and is writable"
            ) from None
        created = OwnedFile(path, _ident(os.fstat(fd)), _ident(os.fstat(dir_fd)))
        try:
            if claimed is not None:
                await claimed(created)
            await create_image(f"/proc/{os.getpid()}/fd/{fd}", fmt, size)
        except BaseException:
            os.close(fd)
            remove_created([created])
            raise
        os.close(fd)
        return created
    finally:
        os.close(dir_fd)


def exists(path: str | Path) -> bool:
    """Local stat; cheap enough to call from the event loop."""
    return os.path.exists(path)


def remove_created(files: Iterable[OwnedFile]) -> list[str]:
    """Remove files the driver created, each only while its path still names that file in
    that directory: the directory is opened (once), its inode compared with the one it
    had at creation, then the name in it is checked with lstat (a symbolic link is not
    followed) and unlinked relative to the opened directory. A missing file is fine; a
    path that now names something else is left alone. Returns the paths left alone."""
    kept: list[str] = []
    for f in files:
        try:
            dir_fd = _open_dir(f.path)
        except OSError:
            kept.append(f.path)  # the directory is gone or no longer one
            continue
        try:
            if _ident(os.fstat(dir_fd)) != f.dir_ident:
                kept.append(f.path)
                continue
            name = os.path.basename(f.path)
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if _ident(st) != f.ident:
                kept.append(f.path)
                continue
            os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    return kept


def fsync_files(paths: Iterable[str | Path]) -> None:
    """Make finished targets durable (blocking: run it in a worker thread)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
