"""The libvirt-style domain XML subset the qemu driver accepts.

``<domain><name/><uuid/>?<memory unit='MiB'/>?<devices><disk type='file' device='disk'>
<driver name='qemu' type='qcow2'/><source file='…'/><target dev='vda'/></disk>…</devices>
</domain>``. Parsed without DTDs, entities or network access; anything else is an XMLError.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from attrs import frozen
from lxml import etree

from jobcore.errors import XMLError

MAX_XML = 1 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}$")
_DEV_RE = re.compile(r"^[a-z][a-z0-9]{0,15}$")
_UNITS = {
    "b": 1,
    "bytes": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 1000**2,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 1000**3,
}


@frozen
class DiskDef:
    target: str
    source: str
    format: str


@frozen
class DomainDef:
    name: str
    uuid: uuid.UUID
    memory: int  # bytes
    disks: tuple[DiskDef, ...]


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        dtd_validation=False,
        load_dtd=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def _fail(msg: str, el: etree._Element | None = None) -> XMLError:
    line = el.sourceline if el is not None else None
    return XMLError(f"domain XML: {msg}", line=line if isinstance(line, int) else None)


def parse_domain(xml: str | bytes) -> DomainDef:
    data = xml.encode() if isinstance(xml, str) else xml
    if len(data) > MAX_XML:
        raise XMLError("domain XML: document larger than 1 MiB refused")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise XMLError(f"domain XML: {exc.msg}", line=exc.lineno) from None
    tree = root.getroottree()
    docinfo: Any = tree.docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        raise _fail("DTDs are refused", root)
    if root.tag != "domain":
        raise _fail(f"root element must be <domain>, not <{root.tag}>", root)
    name_el = root.find("name")
    name = (name_el.text or "").strip() if name_el is not None else ""
    if not _NAME_RE.match(name):
        raise _fail(f"invalid or missing <name> {name!r}", name_el if name_el is not None else root)
    dom_uuid = uuid.uuid4()
    uuid_el = root.find("uuid")
    if uuid_el is not None:
        try:
            dom_uuid = uuid.UUID((uuid_el.text or "").strip())
        except ValueError:
            raise _fail("invalid <uuid>", uuid_el) from None
    memory = 0
    mem_el = root.find("memory")
    if mem_el is not None:
        unit = (mem_el.get("unit") or "KiB").lower()
        if unit not in _UNITS:
            raise _fail(f"unknown memory unit {unit!r}", mem_el)
        try:
            memory = int((mem_el.text or "").strip()) * _UNITS[unit]
        except ValueError:
            raise _fail("<memory> must be an integer", mem_el) from None
        if memory < 0:
            raise _fail("<memory> must not be negative", mem_el)
    disks: list[DiskDef] = []
    devices = root.find("devices")
    for disk in devices.findall("disk") if devices is not None else []:
        disks.append(_parse_disk(disk))
    names = [d.target for d in disks]
    if len(set(names)) != len(names):
        raise _fail("a disk target is used twice", devices)
    return DomainDef(name=name, uuid=dom_uuid, memory=memory, disks=tuple(disks))


def _parse_disk(disk: etree._Element) -> DiskDef:
    if disk.get("type", "file") != "file":
        raise _fail("only <disk type='file'> is supported", disk)
    if disk.get("device", "disk") != "disk":
        raise _fail("only <disk device='disk'> is supported", disk)
    src = disk.find("source")
    target = disk.find("target")
    if src is None or not src.get("file"):
        raise _fail("<disk> needs <source file='…'/>", disk)
    if target is None or not _DEV_RE.match(target.get("dev") or ""):
        raise _fail("<disk> needs <target dev='…'/> (e.g. vda)", disk)
    fmt = "qcow2"
    drv = disk.find("driver")
    if drv is not None:
        fmt = drv.get("type") or "qcow2"
        if drv.get("name", "qemu") != "qemu":
            raise _fail("<driver name> must be 'qemu'", drv)
    if fmt not in ("qcow2", "raw"):
        raise _fail(f"unsupported disk format {fmt!r}", drv)
    source = src.get("file") or ""
    if not source.startswith("/"):
        raise _fail("<source file> must be an absolute path", src)
    return DiskDef(target=target.get("dev") or "", source=source, format=fmt)
