"""Re-adoption: a domain rebuilt from a QEMU a previous owner of the run directory started.

The disks and their backing chains come from QEMU itself: its block graph
(``x-debug-query-block-graph``: which node is whose ``backing``) and its nodes
(``query-named-block-nodes``: each node's file, format and size). Layer nodes are the ones
the driver named ``DISK-L<n>``; a disk's active layer is the layer no other layer of the
disk has as backing (several: the lowest ``n``, the disk's first layer; the others are
layers a stream or commit merged and the dead owner had not deleted yet, kept in
``Disk.orphans`` for the job's recovery). Name, uuid and memory come from the command line.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from drivers.qemu.domain import Disk, Domain, Layer, virt_type
from drivers.qemu.images import owned_file
from drivers.qemu.process import QemuProcess
from drivers.qemu.rundir import _argument

_LAYER = re.compile(r"^(?P<disk>.+)-L(?P<n>\d+)$")
_NUMBERED = re.compile(r"-(\d+)$")


def command_line(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def is_incoming(pid: int) -> bool:
    """True for a migration destination (``-incoming defer``)."""
    return _argument(command_line(pid), b"-incoming") is not None


async def rebuild_domain(proc: QemuProcess) -> Domain:
    """The domain ``proc`` runs, as the driver knew it (see the module docstring)."""
    argv = command_line(proc.pid)
    raw_uuid = _argument(argv, b"-uuid")
    dom_uuid = uuid.UUID(raw_uuid.decode()) if raw_uuid else uuid.uuid4()
    mem = _argument(argv, b"-m")
    memory = int(mem.decode().rstrip("M")) << 20 if mem else 0
    graph = await proc.execute("x-debug-query-block-graph")
    nodes = await proc.execute("query-named-block-nodes", {"flat": True})
    info = {str(n.get("node-name")): n for n in nodes}
    by_id = {n["id"]: str(n.get("name")) for n in graph.get("nodes", ())}
    backing: dict[str, str] = {}
    for edge in graph.get("edges", ()):
        if edge.get("name") == "backing":
            backing[by_id.get(edge["parent"], "")] = by_id.get(edge["child"], "")
    layers: dict[str, list[tuple[int, str]]] = {}
    top = 0
    for name in info:
        numbered = _NUMBERED.search(name)
        if numbered:
            top = max(top, int(numbered[1]) + 1)
        m = _LAYER.match(name)
        if m and info[name].get("drv") in ("qcow2", "raw"):
            layers.setdefault(m["disk"], []).append((int(m["n"]), name))
    disks: dict[str, Disk] = {}
    for disk_name, found in sorted(layers.items(), key=lambda kv: min(kv[1])):
        names = {n for _, n in found}
        below = {backing[n] for n in names if backing.get(n) in names}
        roots = sorted((n, name) for n, name in found if name not in below)
        chain: list[Layer] = []
        node: str | None = roots[0][1]
        while node is not None and node in names and all(node != layer.node for layer in chain):
            file = str(info[node].get("file"))
            chain.append(Layer(node, file, str(info[node].get("drv")), owned_file(file)))
            node = backing.get(node)
        in_chain = {layer.node for layer in chain}
        orphans = []
        for _, n in sorted(found):
            if n not in in_chain:
                file = str(info[n].get("file"))
                orphans.append(Layer(n, file, str(info[n].get("drv")), owned_file(file)))
        size = int((info[chain[0].node].get("image") or {}).get("virtual-size", 0))
        disks[disk_name] = Disk(disk_name, chain, size, orphans=orphans)
    domain = Domain(proc.name, dom_uuid, memory, disks, proc, generation=proc.generation)
    domain.virt_type = await virt_type(proc)
    domain.skip_node_names(top)
    return domain
