"""libvirt's ``<domaincheckpoint>``: element <-> CheckpointDef.

Settable at creation: name, description, disks. Read-only, accepted for redefinition:
creationTime, parent, and the embedded ``<domain>``, which is kept as written (elements,
attribute order, text, comments, namespaces), laid out as libvirt lays it out, and never
interpreted.
"""

from __future__ import annotations

from lxml import etree

from jobcore.backup import CheckpointDef, CheckpointDisk, CheckpointKind
from jobcore.xml import _types as T
from jobcore.xml._parse import (
    attr_choice,
    check_depth,
    fail,
    parse_document,
    repeated,
    trusted,
)
from jobcore.xml._types import abs_path, checkpoint_name, disk_dev
from jobcore.xml._write import serialize

_ELEMENT = etree.Element


def parse_checkpoint_element(el: etree._Element) -> CheckpointDef:
    """A schema-valid ``<domaincheckpoint>`` element -> CheckpointDef."""
    name = description = parent = domain = None
    creation_time: int | None = None
    disks: tuple[CheckpointDisk, ...] = ()
    seen: set[str] = set()
    for child in el:  # comments and PIs match no branch
        tag = child.tag
        if not isinstance(tag, str):
            continue
        if tag in seen:
            repeated(child)
        seen.add(tag)
        if tag == "disks":
            disks = _parse_disks(child)
        elif tag == "name":
            name = child.text or ""
            if checkpoint_name(name) is None:
                T.check(child, None, name, "checkpointName")
        elif tag == "description":
            description = child.text or None
        elif tag == "parent":
            # its one <name> (the grammar's), not a comment before it
            parent = T.text(next(child.iterchildren("name")), "checkpointName")
        elif tag == "creationTime":
            creation_time = int(child.text or "")
        elif tag == "domain":
            domain = _domain_text(child)
    return _new_def(name, description, disks, creation_time, parent, domain)


_KINDS = {k.value: k for k in CheckpointKind}
_NO = CheckpointKind.NO
# made without attrs' __init__ (CheckpointDef's converter: the disks come as a tuple)
_new_def = trusted(CheckpointDef)
_new_disk = trusted(CheckpointDisk)


def _parse_disks(el: etree._Element) -> tuple[CheckpointDisk, ...]:
    """The ``<disk>``s of ``<disks>``; a name twice is refused where it is met."""
    names: set[str] = set()
    disks: list[CheckpointDisk] = []
    for disk_el in el:
        if disk_el.tag != "disk":
            continue  # a comment (the grammar admits no other child)
        disk = _parse_disk(disk_el)
        name = disk.name
        if name in names:
            fail(disk_el, f"disk '{name}' is named twice")
        names.add(name)
        disks.append(disk)
    return tuple(disks)


def _parse_disk(el: etree._Element) -> CheckpointDisk:
    get = el.get
    kind = attr_choice(el, b"checkpoint", _KINDS)
    bitmap = get(b"bitmap")
    size = get(b"size")
    if kind is _NO:
        for attr, value in (("bitmap", bitmap), ("size", size)):
            if value is not None:
                fail(el, "only a disk with checkpoint='bitmap' has a bitmap", attr)
    name = get(b"name", "")
    if disk_dev(name) is None and abs_path(name) is None:
        T.check(el, "name", name, "diskTargetDev", "absFilePath")
    if bitmap == "":
        T.check(el, "bitmap", bitmap, "nonEmpty")
    return _new_disk(name, kind, bitmap, int(size) if size is not None else None)


def _domain_text(el: etree._Element) -> str:
    """The ``<domain>`` subtree as standalone text in libvirt's layout (column 0)."""
    check_depth(el)
    return serialize(el).rstrip("\n")


def build_checkpoint_element(
    defn: CheckpointDef, parent: etree._Element | None = None
) -> etree._Element:
    """CheckpointDef -> ``<domaincheckpoint>`` element, in libvirt's order."""
    el = (
        etree.Element("domaincheckpoint")
        if parent is None
        else etree.SubElement(parent, "domaincheckpoint")
    )
    if defn.name is not None:
        etree.SubElement(el, "name").text = defn.name
    if defn.description is not None:
        etree.SubElement(el, "description").text = defn.description
    if defn.parent is not None:
        etree.SubElement(etree.SubElement(el, "parent"), "name").text = defn.parent
    if defn.creation_time is not None:
        etree.SubElement(el, "creationTime").text = str(defn.creation_time)
    if defn.disks:
        disks = etree.SubElement(el, "disks")
        for disk in defn.disks:
            d = etree.SubElement(disks, "disk")
            d.set("name", disk.name)
            if disk.checkpoint is not None:
                d.set("checkpoint", str(disk.checkpoint))
            if disk.bitmap is not None:
                d.set("bitmap", disk.bitmap)
            if disk.size is not None:
                d.set("size", str(disk.size))
    if defn.domain is not None:
        el.append(parse_document(defn.domain, "domain", max_bytes=None))  # our own text
    return el
