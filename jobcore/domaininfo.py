"""DomainInfo and its DiskInfo: a domain as its driver reports it (``dom.info()``).

Plain values below the driver protocol (jobcore.driver names them too), so the wire and a
jobd client carry them without loading the driver protocol."""

from __future__ import annotations

import uuid

from attrs import frozen


@frozen
class DiskInfo:
    """One disk of a domain: its target name and backing chain (index 0 = active layer)."""

    name: str
    chain: tuple[str, ...]  # file paths, active layer first
    format: str = "qcow2"
    virtual_size: int = 0
    #: the format of each layer of ``chain`` (empty: every layer is ``format``)
    formats: tuple[str, ...] = ()
    #: the bus its definition named (``<target bus>``; shown again by XMLDesc)
    bus: str = "virtio"

    @property
    def source(self) -> str:
        return self.chain[0]

    def layer_format(self, index: int) -> str:
        return self.formats[index] if index < len(self.formats) else self.format


@frozen
class DomainInfo:
    name: str
    uuid: uuid.UUID
    disks: tuple[DiskInfo, ...]
    memory: int = 0  # bytes
    running: bool = True
    #: what runs it, as libvirt's ``<domain type>``: 'kvm' or 'qemu' (QEMU with or
    #: without KVM), 'test' (the sim driver)
    virt_type: str = "test"

    def disk(self, name: str) -> DiskInfo | None:
        for d in self.disks:
            if d.name == name:
                return d
        return None
