"""libvirt's domain XML: the definition jobcore runs, parsed from a real ``<domain>``, and
the live description it gives back (``virDomainGetXMLDesc``'s shape).

What jobcore models: ``<name>``, ``<uuid>``, ``<memory>``, the domain's ``type`` and its
file disks (``<disk type='file' device='disk'>`` with ``<driver name='qemu' type=FMT>``,
``<source file=ABS>``, ``<target dev bus>`` and any ``<backingStore>`` chain). Everything
else a libvirt domain XML holds (``<os>``, ``<vcpu>``, ``<cpu>``, ``<features>``,
``<clock>``, ``<emulator>``, controllers, interfaces, consoles, graphics, ``<address>``,
``<alias>``, ``<boot>``, driver ``cache``/``discard``/``io``…, CD-ROM and floppy disks,
other namespaces) is ignored, not refused: design/xml.md lists it. What is wrong or what
jobcore cannot run (network, volume or block disks, an unknown format, a file disk without
its source, two disks on one target) is an XMLError naming element, attribute and line.
Parsed as every jobcore document is (jobcore.xml._parse: no DTD, no entities, no network,
at most 1 MiB).
"""

from __future__ import annotations

import re
import uuid

from attrs import frozen
from lxml import etree

from jobcore.errors import XMLError
from jobcore.xml._parse import check_depth, fail, line_of, one_of, parse_document
from jobcore.xml._write import esc_attr, esc_text

#: libvirt's domain name rule as jobcore applies it (also a safe file-name stem)
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}$")
_DEV_RE = re.compile(r"^[a-z][a-z0-9]{0,15}$")
#: libvirt's memory units (bytes each)
UNITS = {
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
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 1000**4,
}
#: the image formats jobcore runs
FORMATS = ("qcow2", "raw")
#: libvirt's disk buses (kept and shown again; QEMU attaches no guest device here)
BUSES = ("virtio", "scsi", "sata", "ide", "usb", "fdc", "xen", "sd", "uml")
#: libvirt's domain types (``<domain type>``; the driver decides what it runs)
VIRT_TYPES = ("kvm", "qemu", "test", "kqemu", "xen", "lxc", "hvf", "vmware", "hyperv")
#: disks of these devices are ignored (jobcore backs up and streams disks only)
IGNORED_DEVICES = ("cdrom", "floppy")


@frozen
class BackingDef:
    """One layer below a disk's source, as a ``<backingStore>`` names it."""

    file: str
    format: str


@frozen
class DiskDef:
    target: str
    source: str
    format: str
    bus: str = "virtio"
    #: the ``<backingStore>`` chain the XML gave, top down (the qemu driver reads the
    #: images' own headers instead; the sim driver, whose images have none, uses this)
    backing: tuple[BackingDef, ...] = ()

    @property
    def chain(self) -> tuple[str, ...]:
        return (self.source, *(b.file for b in self.backing))


@frozen
class DomainDef:
    """A parsed, checked domain definition: what ``create_domain`` hands a driver."""

    name: str
    uuid: uuid.UUID
    memory: int  # bytes
    disks: tuple[DiskDef, ...]
    #: ``<domain type>`` as written (None: absent)
    virt_type: str | None = None

    def disk(self, target: str) -> DiskDef | None:
        return next((d for d in self.disks if d.target == target), None)


# ---- parsing --------------------------------------------------------------------------


def parse_domain(doc: str | bytes) -> DomainDef:
    """A ``<domain>`` document (libvirt's, as ``virsh dumpxml`` prints it) → DomainDef."""
    root = parse_document(doc, "domain")
    check_depth(root)
    virt_type = root.get("type")
    if virt_type is not None and virt_type not in VIRT_TYPES:
        fail(root, f"'{virt_type[:80]}' is not one of {one_of(VIRT_TYPES)}", "type")
    name_el = _one(root, "name")
    if name_el is None:
        fail(root, "a domain needs a <name>")
    name = (name_el.text or "").strip()
    if not _NAME_RE.match(name):
        fail(
            name_el,
            f"invalid domain name '{name[:80]}': 1 to 64 letters, digits and '_.+-', "
            "not starting with '.', '+' or '-'",
        )
    dom_uuid = uuid.uuid4()
    uuid_el = _one(root, "uuid")
    if uuid_el is not None:
        try:
            dom_uuid = uuid.UUID((uuid_el.text or "").strip())
        except ValueError:
            fail(uuid_el, f"'{(uuid_el.text or '').strip()[:80]}' is not a UUID")
    mem_el = _one(root, "memory")
    memory = 0 if mem_el is None else _memory(mem_el)
    disks: list[DiskDef] = []
    devices = _one(root, "devices")
    seen: dict[str, etree._Element] = {}
    for el in devices.iterchildren("disk") if devices is not None else ():
        disk = _parse_disk(el)
        if disk is None:
            continue
        if disk.target in seen:
            fail(
                el,
                f"target '{disk.target}' is used by the disk at line "
                f"{line_of(seen[disk.target])} too: each disk needs a target of its own",
            )
        seen[disk.target] = el
        disks.append(disk)
    return DomainDef(name, dom_uuid, memory, tuple(disks), virt_type)


def _one(parent: etree._Element, tag: str) -> etree._Element | None:
    found = list(parent.iterchildren(tag))
    if len(found) > 1:
        fail(found[1], f"<{tag}> may appear only once in <{parent.tag}>")
    return found[0] if found else None


def _memory(el: etree._Element) -> int:
    unit = el.get("unit") or "KiB"
    if unit.lower() not in UNITS:
        fail(el, f"unknown memory unit '{unit[:80]}'", "unit")
    text = (el.text or "").strip()
    if not text.isascii() or not text.isdigit():
        fail(el, f"'{text[:80]}' is not a non-negative integer")
    return int(text) * UNITS[unit.lower()]


def _parse_disk(el: etree._Element) -> DiskDef | None:
    device = el.get("device") or "disk"
    if device in IGNORED_DEVICES:
        return None
    if device != "disk":
        fail(el, f"device '{device[:80]}' cannot be run: jobcore runs device='disk'", "device")
    kind = el.get("type") or "file"
    if kind != "file":
        fail(
            el,
            f"a '{kind[:80]}' disk cannot be run: jobcore runs file disks only "
            "(type='file' with <source file='/ABS/PATH'/>)",
            "type",
        )
    # what would make the guest's writes land elsewhere than the XML says: refused
    if _one(el, "readonly") is not None:
        fail(el, "read-only disks are not supported (every disk is opened read-write)")
    if _one(el, "transient") is not None:
        fail(el, "transient disks are not supported (writes go to the image itself)")
    target_el = _one(el, "target")
    if target_el is None:
        fail(el, "a disk needs <target dev='…'/> (e.g. vda)")
    target = target_el.get("dev") or ""
    if not _DEV_RE.match(target):
        fail(target_el, f"invalid target '{target[:80]}' (e.g. vda)", "dev")
    bus = target_el.get("bus") or "virtio"
    if bus not in BUSES:
        fail(target_el, f"'{bus[:80]}' is not one of {one_of(BUSES)}", "bus")
    fmt = "qcow2"
    drv = _one(el, "driver")
    if drv is not None:
        if (drv.get("name") or "qemu") != "qemu":
            fail(drv, f"'{drv.get('name', '')[:80]}' is not 'qemu'", "name")
        fmt = _format(drv, drv.get("type") or "qcow2")
    source = _file_source(el, f"disk '{target}'")
    backing = _backing_chain(el, target, source)
    return DiskDef(target, source, fmt, bus, backing)


def _format(el: etree._Element, fmt: str) -> str:
    if fmt not in FORMATS:
        fail(el, f"unknown disk format '{fmt[:80]}': jobcore runs {one_of(FORMATS)}", "type")
    return fmt


def _file_source(el: etree._Element, what: str) -> str:
    src = _one(el, "source")
    if src is None or not src.get("file"):
        fail(el, f"{what} needs <source file='/ABS/PATH'/>")
    if _one(src, "encryption") is not None or _one(el, "encryption") is not None:
        fail(el, f"{what}: encrypted images are not supported (jobcore holds no secrets)")
    path = src.get("file") or ""
    if not path.startswith("/"):
        fail(src, f"'{path[:80]}' is not an absolute path", "file")
    if "\0" in path:
        fail(src, "a path has no NUL character", "file")
    return path


def _backing_chain(disk: etree._Element, target: str, source: str) -> tuple[BackingDef, ...]:
    layers: list[BackingDef] = []
    el = _one(disk, "backingStore")
    # <backingStore/> (no element inside): the chain ends here
    while el is not None and any(isinstance(child.tag, str) for child in el):
        kind = el.get("type") or "file"
        if kind != "file":
            fail(el, f"a '{kind[:80]}' backing store cannot be run: file layers only", "type")
        fmt_el = _one(el, "format")
        fmt = "qcow2" if fmt_el is None else _format(fmt_el, fmt_el.get("type") or "qcow2")
        what = f"backing layer {len(layers) + 1} of disk '{target}'"
        file = _file_source(el, what)
        if file in (source, *(b.file for b in layers)):
            fail(el, f"{what}: '{file[:80]}' is in the chain already (a loop)")
        layers.append(BackingDef(file, fmt))
        el = _one(el, "backingStore")
    return tuple(layers)


# ---- formatting -----------------------------------------------------------------------


def format_domain(ddef: DomainDef, *, inactive: bool = False) -> str:
    """libvirt's live domain XML for ``ddef``: each disk's current chain as nested
    ``<backingStore>`` (``inactive``: the persistent shape, without the chain, as
    VIR_DOMAIN_XML_INACTIVE gives it). jobcore's own parser reads it back."""
    kib = ddef.memory // 1024
    out = [
        f"<domain type='{esc_attr(ddef.virt_type or 'test')}'>",
        f"  <name>{esc_text(ddef.name)}</name>",
        f"  <uuid>{ddef.uuid}</uuid>",
        f"  <memory unit='KiB'>{kib}</memory>",
        f"  <currentMemory unit='KiB'>{kib}</currentMemory>",
        "  <devices>",
    ]
    for disk in ddef.disks:
        out += [
            "    <disk type='file' device='disk'>",
            f"      <driver name='qemu' type='{esc_attr(disk.format)}'/>",
            f"      <source file='{esc_attr(disk.source)}'/>",
        ]
        if not inactive:
            out += _backing_lines(disk.backing, "      ")
        out.append(f"      <target dev='{esc_attr(disk.target)}' bus='{esc_attr(disk.bus)}'/>")
        out.append("    </disk>")
    out += ["  </devices>", "</domain>", ""]
    return "\n".join(out)


def _backing_lines(backing: tuple[BackingDef, ...], indent: str) -> list[str]:
    lines: list[str] = []
    for layer in backing:
        lines += [
            f"{indent}<backingStore type='file'>",
            f"{indent}  <format type='{esc_attr(layer.format)}'/>",
            f"{indent}  <source file='{esc_attr(layer.file)}'/>",
        ]
        indent += "  "
    lines.append(f"{indent}<backingStore/>")
    for _ in backing:
        indent = indent[:-2]
        lines.append(f"{indent}</backingStore>")
    return lines


def domain_error(message: str, line: int | None = None) -> XMLError:
    """An XMLError about a domain definition found wrong after parsing (by a driver)."""
    return XMLError(f"domain XML: {message}", line=line)
