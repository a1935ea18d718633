"""qemu-img helpers: read backing chains and create target/scratch images."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
from attrs import frozen

from jobcore.errors import DriverError

QEMU_IMG = "qemu-img"


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
    result = await anyio.run_process([qemu_binary(QEMU_IMG), *args], check=False)
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


async def backing_chain(path: str, fmt: str) -> list[ImageInfo]:
    """The image's chain, active layer first (``qemu-img info --backing-chain``)."""
    try:
        out = await _run("info", "-U", "--backing-chain", "--output=json", "-f", fmt, path)
    except QemuImgFailed as exc:
        raise DriverError(unreadable_image(path, fmt, exc.stderr)) from None
    data: Any = json.loads(out)
    entries = data if isinstance(data, list) else [data]
    return [
        ImageInfo(
            filename=str(e["filename"]),
            format=str(e["format"]),
            virtual_size=int(e["virtual-size"]),
        )
        for e in entries
    ]


async def image_info(path: str) -> ImageInfo:
    """One image's format (probed) and virtual size, read-only (``qemu-img info -U``)."""
    data: Any = json.loads(await _run("info", "-U", "--output=json", path))
    return ImageInfo(
        filename=str(data["filename"]),
        format=str(data["format"]),
        virtual_size=int(data["virtual-size"]),
    )


async def create_image(path: str, fmt: str, size: int) -> None:
    await _run("create", "-q", "-f", fmt, path, str(size))


async def create_new_image(path: str, fmt: str, size: int) -> bool:
    """Create an image at ``path`` only if nothing is there (not even a dangling symlink):
    the name is claimed with O_EXCL first, so an existing file is never opened for
    writing. False when something exists; on failure nothing is left behind."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileExistsError:
        return False
    except OSError as exc:
        raise DriverError(
            f"cannot create backup file '{path}': {exc.strerror or exc}; "
            "check that its directory exists and is writable"
        ) from None
    os.close(fd)
    try:
        await create_image(path, fmt, size)
    except BaseException:
        remove_files([path])
        raise
    return True


def exists(path: str | Path) -> bool:
    """Local stat; cheap enough to call from the event loop."""
    return os.path.exists(path)


def remove_files(paths: Iterable[str | Path]) -> None:
    """Remove files the driver created (targets, scratch, sockets); missing ones are fine."""
    for path in paths:
        Path(path).unlink(missing_ok=True)


def fsync_files(paths: Iterable[str | Path]) -> None:
    """Make finished targets durable (blocking: run it in a worker thread)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
