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
from jobcore.errors import InvalidArgument, NoSuchDomain

GiB = 1 << 30
MiB = 1 << 20
#: simulated hosts one connection's world holds at most (its own and migration targets)
MAX_HOSTS = 64


@define
class SimDisk:
    name: str
    chain: list[str]
    virtual_size: int

    def info(self) -> DiskInfo:
        return DiskInfo(self.name, tuple(self.chain), "qcow2", self.virtual_size)


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
            self.name, self.uuid, tuple(d.info() for d in self.disks.values()), self.memory
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
        if self.persist is not None:
            self.persist.host(host)

    def add_files(self, host: SimHost, files: Iterable[tuple[str, SimFile]]) -> None:
        for path, f in files:
            host.files[path] = f
            if self.persist is not None:
                self.persist.file_added(host, path, f)

    def remove_file(self, host: SimHost, path: str) -> None:
        if host.files.pop(path, None) is not None and self.persist is not None:
            self.persist.file_removed(host, path)

    def domain(self, name: str) -> SimDomain:
        """A domain of this host or, once migrated, of another host of this world: the
        connection's handles follow their domains."""
        where = self.where.get(name)
        dom = None if where is None else self.hosts[where].domains.get(name)
        if dom is None:
            raise NoSuchDomain(f"domain '{name}' not found on '{self.uri}'")
        return dom

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
