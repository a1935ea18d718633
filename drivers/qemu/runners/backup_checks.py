"""What a backup is refused for, checked before admission and again when it starts:
its target and scratch files (libvirt's rules), a pull backup's NBD server, export bitmaps.
"""

from __future__ import annotations

import os

from drivers.qemu.domain import Domain
from drivers.qemu.images import image_info
from drivers.qemu.process import QemuProcess
from drivers.qemu.runners.host import Host
from jobcore.backup import ServerTransport, StoreType
from jobcore.driver import store_exists, store_in_use, store_missing, store_unusable
from jobcore.errors import DriverError, InvalidArgument, Unsupported
from jobcore.rundir import reserved_dir_holding
from jobcore.scheduler import normalize_path
from jobcore.types.backup import PreparedBackup


def image_owner(conn: Host, path: str) -> str | None:
    """Which domain's disk image ``path`` is (any layer of any chain), if any."""
    real = os.path.realpath(path)
    for dom in conn.domains.values():
        for disk in dom.disks.values():
            if any(os.path.realpath(layer.file) == real for layer in disk.layers):
                return f"an image of disk '{disk.name}' of domain '{dom.name}'"
    return None


def run_dir_holding(conn: Host, path: str) -> str | None:
    """The run directory (this connection's, or one jobd or another connection of this
    process reserved) that ``path`` would be created in, if any."""
    real = normalize_path(path)
    own = os.path.realpath(conn.run_dir)
    if real == own or real.startswith(own.rstrip("/") + "/"):
        return own
    return reserved_dir_holding(real)


def _refuse_present(conn: Host, reuse: bool, stores: list[tuple[str, str, str, int]]) -> None:
    """The local part of check_backup_stores (a few stat calls, no I/O on the files)."""
    named: dict[str, str] = {}
    for disk, path, _fmt, _size in stores:
        real = os.path.realpath(path)
        if real in named:
            raise InvalidArgument(f"store '{path}' is named for disks '{named[real]}' and '{disk}'")
        named[real] = disk
        owner = image_owner(conn, path)
        if owner is not None:
            raise store_in_use(path, disk, owner)
        held = run_dir_holding(conn, path)
        if held is not None:
            raise InvalidArgument(
                f"store '{path}' for backup of '{disk}' is inside the run directory '{held}', "
                "whose files belong to jobd and the qemu driver: name a file elsewhere"
            )
        present = os.path.lexists(path)  # a dangling symlink exists too
        if present and not reuse:
            raise store_exists(path, disk)
        if not present and reuse:
            raise store_missing(path, disk)


async def check_backup_stores(
    conn: Host, reuse: bool, stores: list[tuple[str, str, str, int]]
) -> None:
    """libvirt's rule for (disk, path, format, disk size) of each target/scratch file: an
    existing file (a dangling symlink too) is refused unless ``reuse``
    (VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL), and a reused one must exist with that format
    and the disk's virtual size (QEMU's backup job refuses another size). Nothing is
    opened for writing; a disk image of a domain is refused even with ``reuse``."""
    _refuse_present(conn, reuse, stores)
    if not reuse:
        return
    for disk, path, fmt, size in stores:
        try:
            info = await image_info(path)
        except DriverError as exc:
            raise store_unusable(path, disk, f"it cannot be read as an image ({exc})") from None
        if info.format != fmt:
            raise store_unusable(path, disk, f"its format is '{info.format}', not '{fmt}'")
        if info.virtual_size != size:
            raise store_unusable(
                path,
                disk,
                f"its virtual size is {info.virtual_size} bytes, disk '{disk}' has {size}",
            )


#: the only hosts a TCP NBD server binds to: NBD without TLS has no authentication
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def _disk_names(spec: PreparedBackup) -> str:
    names = [d.name for d in spec.disks]
    return ("disk " if len(names) == 1 else "disks ") + ", ".join(f"'{n}'" for n in names)


def check_nbd_socket(conn: Host, path: str) -> None:
    """A socket a pull backup names: not inside a run directory, and nothing there yet
    (lstat: a dangling symlink counts). Binding it later fails if anything appeared."""
    held = run_dir_holding(conn, path)
    if held is not None:
        raise InvalidArgument(
            f"NBD socket '{path}' of the pull backup is inside the run directory '{held}', "
            "whose files belong to jobd and the qemu driver: name a socket path elsewhere"
        )
    if os.path.lexists(path):
        raise socket_exists(path)


def socket_exists(path: str) -> InvalidArgument:
    return InvalidArgument(
        f"NBD socket '{path}' of the pull backup exists: a pull backup creates its socket and "
        "never replaces a file (not even with VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL, which "
        "reuses target and scratch images only): name a path where nothing is, or remove "
        "the file if it is a stale socket of yours"
    )


def check_pull_server(conn: Host, spec: PreparedBackup) -> None:
    """A pull backup's <server>, before anything starts: what the driver cannot serve as
    asked is refused, never served otherwise (TLS in clear text, another address)."""
    if not spec.pull:
        return
    server = spec.backup.server
    if server is not None and server.tls:
        raise Unsupported(
            f"pull backup of {_disk_names(spec)}: <server tls='yes'> asks for an NBD server "
            "with TLS, and the qemu driver has no TLS credentials configured (it would export "
            "the disk in clear text): leave tls out, or use a unix socket"
        )
    if server is None or server.transport is ServerTransport.UNIX:
        if server is not None and server.socket:
            check_nbd_socket(conn, server.socket)
        return
    if server.transport is ServerTransport.TCP or server.transport is None:
        if not server.port:
            raise DriverError("<domainbackup> must specify TCP port for now")
        host = server.name or "localhost"
        if host not in LOOPBACK_HOSTS:
            raise Unsupported(
                f"pull backup of {_disk_names(spec)}: the qemu driver serves NBD on loopback "
                f"only (localhost, 127.0.0.1, ::1), not on '{host}': NBD without TLS lets "
                "anyone who reaches the port read the disk; use a unix socket or localhost"
            )
        return
    raise Unsupported(f"NBD server transport '{server.transport}' is not supported")


async def node_bitmaps(proc: QemuProcess) -> dict[str, set[str]]:
    """node name -> the names of the dirty bitmaps QEMU has on it."""
    nodes = await proc.execute("query-named-block-nodes", {"flat": True})
    return {
        str(n.get("node-name")): {str(b.get("name")) for b in n.get("dirty-bitmaps") or ()}
        for n in nodes
    }


def export_bitmap_exists(disk: str, bitmap: str) -> InvalidArgument:
    return InvalidArgument(
        f"disk '{disk}': export bitmap '{bitmap}' of the pull backup already exists on the "
        "disk (a checkpoint's bitmap, or another backup's), and a backup never takes over a "
        "bitmap it did not create: name another one with exportbitmap='…'"
    )


async def check_export_bitmaps(spec: PreparedBackup, domain: Domain) -> None:
    """An incremental pull backup's export bitmaps must not exist yet (default
    'backup-<disk>'): the job creates them, and removes only what it created."""
    if not spec.pull or not domain.process.alive:
        return
    wanted = [
        (d.name, d.exportbitmap)
        for d in spec.disks
        if d.name in domain.disks and d.exportbitmap is not None
    ]
    if not wanted:
        return
    existing = await node_bitmaps(domain.process)
    for name, bitmap in wanted:
        if bitmap in existing.get(domain.disks[name].active.node, ()):
            raise export_bitmap_exists(name, bitmap)


async def check_backup_job(conn: Host, spec: PreparedBackup, domain: Domain) -> None:
    """Before admission: the pull server (check_pull_server), the export bitmaps
    (check_export_bitmaps) and the stores the prepared spec names (check_backup_stores)."""
    check_pull_server(conn, spec)
    await check_export_bitmaps(spec, domain)
    stores = []
    for d in spec.disks:
        if d.store_type is StoreType.BLOCK or d.name not in domain.disks:
            continue  # start() refuses
        stores.append((d.name, d.store, d.format, domain.disks[d.name].virtual_size))
    await check_backup_stores(conn, spec.reuse_external, stores)
