"""A domain as the driver keeps it: its process and each disk's block-node chain.

Every layer of every backing chain is its own monitor-owned node (``blockdev-add`` bottom
up, each naming the one below with ``backing``, the bottom one ``backing: null``), so QEMU
never opens a file an image header names, after a stream or a commit the layers that left
the chain can be deleted one by one, and the active layer is simply whichever node is now
the chain's top. Layers below the active one are opened read-only, so domains can share a
base image; block-stream and block-commit reopen read-write what they write, for as long
as they write it.
"""

from __future__ import annotations

import itertools
import re
import uuid
from typing import Any

from attrs import define, field

from drivers.qemu.images import OwnedFile
from drivers.qemu.process import QemuProcess
from jobcore.driver import DiskInfo, DomainInfo


@define
class Layer:
    node: str
    file: str
    format: str
    #: the file (and its directory) as found when the chain was read: what a block
    #: commit's ``<delete/>`` may remove (None: never removed)
    owned: OwnedFile | None = None


@define
class Disk:
    name: str
    layers: list[Layer]  # active layer first
    virtual_size: int
    #: backup filter nodes above the active layer, oldest (outermost) first
    filters: list[str] = field(factory=list)
    #: re-adopted: layer nodes QEMU still has that left the chain (a stream or commit
    #: ended while nobody watched; its recovery deletes them)
    orphans: list[Layer] = field(factory=list)
    #: the definition's ``<target bus>`` (QEMU attaches no guest device; XMLDesc shows it)
    bus: str = "virtio"

    @property
    def active(self) -> Layer:
        return self.layers[0]

    @property
    def top_node(self) -> str:
        """Where guest-like I/O enters: the outermost backup filter, else the active layer."""
        return self.filters[0] if self.filters else self.active.node

    def info(self) -> DiskInfo:
        chain: tuple[str, ...] = tuple(layer.file for layer in self.layers)
        return DiskInfo(
            name=self.name,
            chain=chain,
            format=self.active.format,
            virtual_size=self.virtual_size,
            formats=tuple(layer.format for layer in self.layers),
            bus=self.bus,
        )


@define(eq=False)
class Domain:
    name: str
    uuid: uuid.UUID
    memory: int
    disks: dict[str, Disk]
    process: QemuProcess
    generation: int = 0
    #: libvirt's ``<domain type>`` of what the process runs: 'kvm' when QEMU has KVM
    #: enabled (``query-kvm``), else 'qemu' (TCG)
    virt_type: str = "qemu"
    #: an admin's monitor command ran on it (libvirt's "custom-monitor" taint)
    tainted: bool = False
    _counter: itertools.count[int] = field(factory=itertools.count)

    def info(self) -> DomainInfo:
        disks: tuple[DiskInfo, ...] = tuple(d.info() for d in self.disks.values())
        return DomainInfo(
            name=self.name,
            uuid=self.uuid,
            disks=disks,
            memory=self.memory,
            running=self.process.alive,
            virt_type=self.virt_type,
        )

    def disk(self, name: str) -> Disk:
        from jobcore.errors import DriverError

        try:
            return self.disks[name]
        except KeyError:
            raise DriverError(f"domain '{self.name}' has no disk '{name}'") from None

    def skip_node_names(self, start: int) -> None:
        """Number new node names from ``start`` on (a re-adopted QEMU has nodes already)."""
        self._counter = itertools.count(start)

    def new_node_name(self, prefix: str) -> str:
        """A fresh node name (QEMU allows at most 31 characters)."""
        clean = re.sub(r"[^A-Za-z0-9_]", "_", prefix)[:12] or "n"
        return f"{clean}-{next(self._counter)}"


def blockdev_args(layer: Layer, backing: str | None, *, read_only: bool = False) -> dict[str, Any]:
    """``blockdev-add`` arguments opening one layer over ``backing`` (a node, or none)."""
    args: dict[str, Any] = {
        "driver": layer.format,
        "node-name": layer.node,
        "file": {"driver": "file", "filename": layer.file},
    }
    if read_only:
        args["read-only"] = True
    if layer.format == "qcow2":
        args["backing"] = backing
    return args


async def virt_type(proc: QemuProcess) -> str:
    """libvirt's ``<domain type>`` for what ``proc`` runs: 'kvm' or 'qemu' (TCG)."""
    kvm = await proc.execute("query-kvm")
    return "kvm" if isinstance(kvm, dict) and kvm.get("enabled") else "qemu"
