"""The simulated world of one connection: its hosts, their domains (disks with backing
chains, checkpoints) and the image files each host has.

A connection opens its world with one seeded host (``vm1`` and ``vm2``); migrations add
hosts, at most MAX_HOSTS in all. Every domain lookup is O(1), whatever the hosts: the world
keeps which host holds each domain now.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterable
from typing import Protocol

from attrs import define, field, frozen

from jobcore.driver import DiskInfo, DomainInfo
from jobcore.errors import InvalidArgument, NoSuchDomain, OperationInvalid
from jobcore.paths import Access, PathGuard, PathUse
from jobcore.xml.domain import DiskDef, DomainDef, domain_error

GiB = 1 << 30
MiB = 1 << 20
#: simulated hosts one connection's world holds at most (its own and migration targets)
MAX_HOSTS = 64


@define
class SimDisk:
    name: str
    chain: list[str]
    virtual_size: int
    #: the format of each layer by path (absent: qcow2, as the seeded disks' layers)
    formats: dict[str, str] = field(factory=dict)
    bus: str = "virtio"

    def info(self) -> DiskInfo:
        formats = tuple(self.formats.get(path, "qcow2") for path in self.chain)
        return DiskInfo(
            self.name, tuple(self.chain), formats[0], self.virtual_size, formats, self.bus
        )


@define
class SimDomain:
    name: str
    uuid: uuid.UUID
    disks: dict[str, SimDisk]
    memory: int
    #: the simulated persistent dirty bitmaps: bitmap name -> the disks that have one
    checkpoints: dict[str, tuple[str, ...]] = field(factory=dict)

    def info(self) -> DomainInfo:
        return DomainInfo(
            self.name,
            self.uuid,
            tuple(d.info() for d in self.disks.values()),
            self.memory,
            virt_type="test",
        )


def default_domain(name: str) -> SimDomain:
    base = f"/var/lib/sim/{name}"
    return SimDomain(
        name,
        uuid.uuid5(uuid.NAMESPACE_URL, f"sim:{name}"),
        {
            "vda": SimDisk(
                "vda", [f"{base}/vda.qcow2", f"{base}/vda.1.qcow2", f"{base}/vda.2.qcow2"], GiB
            ),
            "vdb": SimDisk("vdb", [f"{base}/vdb.qcow2"], 512 * MiB),
        },
        512 * MiB,
    )


@frozen
class SimFile:
    """A simulated image file: its format and virtual size."""

    format: str
    virtual_size: int


QCOW2_MAGIC = b"QFI\xfb"


def probe_real_file(path: str) -> SimFile | str:
    """A real file's format and virtual size (qcow2 header, else raw), read-only and
    without following it into a FIFO or device; a string says why it is unusable."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return "it is not a regular file"
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            head = os.read(fd, 32)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if head[:4] == QCOW2_MAGIC and len(head) >= 32:
        return SimFile("qcow2", int.from_bytes(head[24:32], "big"))
    return SimFile("raw", st.st_size)


@define
class SimHost:
    name: str
    domains: dict[str, SimDomain] = field(factory=dict)
    #: backup targets and scratch files that exist on the host, by path
    files: dict[str, SimFile] = field(factory=dict)


class WorldRecorder(Protocol):
    """Where a world's changes are saved (drivers.sim.persist.SimState)."""

    def host(self, host: SimHost) -> None: ...

    def file_added(self, host: SimHost, path: str, f: SimFile) -> None: ...

    def file_removed(self, host: SimHost, path: str) -> None: ...


class SimWorld:
    """The hosts of one connection's world and where each domain is now."""

    def __init__(
        self,
        uri: str,
        home: str,
        *,
        saved: dict[str, SimHost] | None = None,
        persist: WorldRecorder | None = None,
    ) -> None:
        #: the connection's URI (named in messages)
        self.uri = uri
        self.hosts: dict[str, SimHost] = {}
        #: domain name -> the host holding it (every lookup is O(1), whatever the hosts)
        self.where: dict[str, str] = {}
        #: where every change is saved (None: the world lives as long as the connection)
        self.persist = persist
        #: counts the changes of domains and files (``changed``, ``add_files``,
        #: ``remove_file``): a check against the world stands while it is unchanged
        self.version = 0
        #: counts the changes of domains only (``changed``): a domain's DomainInfo is
        #: made again once it moved (every change of a domain is followed by ``changed``)
        self.domains_version = 0
        #: domain name -> (domains_version, the SimDomain, its DomainInfo then)
        self._infos: dict[str, tuple[int, SimDomain, DomainInfo]] = {}
        if saved and home in saved:  # the world a previous process left
            self.hosts = dict(saved)
            for host in self.hosts.values():
                self.where.update((n, host.name) for n in host.domains)
            self.home = self.hosts[home]
        else:
            #: the connection's own host, seeded with vm1 and vm2
            self.home = self.new_host(home, seed=True)

    def new_host(self, name: str, *, seed: bool) -> SimHost:
        host = SimHost(name)
        if len(self.hosts) >= MAX_HOSTS:
            raise InvalidArgument(
                f"cannot add simulated host '{name[:80]}' to the world of '{self.uri}': it "
                f"has {len(self.hosts)} hosts, the limit (drivers.sim.MAX_HOSTS); migrate "
                "to a host it has"
            )
        if seed:
            host.domains = {n: default_domain(n) for n in ("vm1", "vm2")}
            self.where.update((n, name) for n in host.domains)
        self.hosts[name] = host
        self.changed(host)
        return host

    def changed(self, host: SimHost) -> None:
        """``host``'s domains changed (created, destroyed, moved, chain or checkpoints)."""
        self.version += 1
        self.domains_version += 1
        if self.persist is not None:
            self.persist.host(host)

    def add_files(self, host: SimHost, files: Iterable[tuple[str, SimFile]]) -> None:
        for path, f in files:
            self.version += 1
            host.files[path] = f
            if self.persist is not None:
                self.persist.file_added(host, path, f)

    def remove_file(self, host: SimHost, path: str) -> None:
        if host.files.pop(path, None) is not None:
            self.version += 1
            if self.persist is not None:
                self.persist.file_removed(host, path)

    def domain(self, name: str) -> SimDomain:
        """A domain of this host or, once migrated, of another host of this world: the
        connection's handles follow their domains."""
        where = self.where.get(name)
        dom = None if where is None else self.hosts[where].domains.get(name)
        if dom is None:
            raise NoSuchDomain(f"domain '{name}' not found on '{self.uri}'")
        return dom

    def domain_info(self, name: str) -> DomainInfo:
        """``domain(name).info()``, made once per change of the world's domains (a
        DomainInfo is a frozen value)."""
        dom = self.domain(name)
        cached = self._infos.get(name)
        if cached is not None and cached[0] == self.domains_version and cached[1] is dom:
            return cached[2]
        info = dom.info()
        self._infos[name] = (self.domains_version, dom, info)
        return info

    def domain_host(self, name: str) -> str | None:
        """The name of the host in this world that holds domain ``name`` now."""
        return self.where.get(name)

    def host_of(self, domain: str) -> SimHost:
        name = self.domain_host(domain)
        return self.hosts[name] if name is not None else self.home

    def image_owner(self, path: str) -> str | None:
        for name, host_name in self.where.items():
            dom = self.hosts[host_name].domains[name]
            for disk in dom.disks.values():
                if path in disk.chain:
                    return f"an image of disk '{disk.name}' of domain '{dom.name}'"
        return None

    def existing(self, host: SimHost, path: str) -> SimFile | str | None:
        """The file at ``path``: simulated, else a real one on this machine, else None."""
        known = host.files.get(path)
        if known is not None:
            return known
        if os.path.lexists(path):  # a dangling symlink exists too
            return probe_real_file(path)
        return None


#: the virtual size of a simulated image a created domain's XML names and no host has
NEW_IMAGE_SIZE = GiB


def define_domain(
    world: SimWorld, host: SimHost, ddef: DomainDef, guard: PathGuard | None
) -> tuple[SimDomain, list[tuple[str, SimFile]]]:
    """The simulated domain ``ddef`` defines on ``host``, and the simulated files to add.

    Each disk's chain is its ``<source>`` then its ``<backingStore>`` layers (simulated
    images have no headers to read a backing file from). Each file is the host's
    simulated file of that path, else a real file of this machine (probed read-only, its
    format and size), else a new simulated image of the XML's format (NEW_IMAGE_SIZE).
    ``guard`` sees every file first: the sources as written, the backing layers as read.
    """
    if world.domain_host(ddef.name) is not None:
        raise OperationInvalid(f"domain '{ddef.name}' already exists on '{world.uri}'")
    created: dict[str, SimFile] = {}
    disks: dict[str, SimDisk] = {}
    for d in ddef.disks:
        if guard is not None:
            guard([PathUse(d.source, Access.WRITE, f"source of disk '{d.target}'")])
            guard(
                PathUse(b.file, Access.READ, f"backing file {i} of disk '{d.target}'")
                for i, b in enumerate(d.backing, 1)
            )
        owner = world.image_owner(d.source)
        if owner is not None or any(d.source in x.chain for x in disks.values()):
            raise InvalidArgument(
                f"source '{d.source}' of disk '{d.target}' is "
                f"{owner or 'another disk of this domain'}: name an image no disk runs on"
            )
        formats: dict[str, str] = {}
        sizes: list[int] = []
        for path, fmt in zip(d.chain, (d.format, *(b.format for b in d.backing)), strict=True):
            f = created.get(path) or _image(world, host, d, path, fmt)
            formats[path] = f.format
            sizes.append(f.virtual_size)
            if path not in host.files and not os.path.lexists(path):
                created[path] = f
        disks[d.target] = SimDisk(d.target, list(d.chain), sizes[0], formats, d.bus)
    dom = SimDomain(ddef.name, ddef.uuid, disks, ddef.memory)
    return dom, list(created.items())


def _image(world: SimWorld, host: SimHost, d: DiskDef, path: str, fmt: str) -> SimFile:
    found = world.existing(host, path)
    if found is None:
        return SimFile(fmt, NEW_IMAGE_SIZE)
    if isinstance(found, str):
        raise domain_error(f"image '{path}' of disk '{d.target}' cannot be used: {found}")
    if found.format != fmt:
        raise domain_error(
            f"image '{path}' of disk '{d.target}' is {found.format}, not {fmt}: "
            "name its format in <driver type> (or <format type> of a backing store)"
        )
    return found
