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
    check_depth,
    children_once,
    choice,
    fail,
    parse_disks,
    parse_document,
)
from jobcore.xml._write import serialize

_ELEMENT = etree.Element


def parse_checkpoint_element(el: etree._Element) -> CheckpointDef:
    """A schema-valid ``<domaincheckpoint>`` element -> CheckpointDef."""
    name = description = parent = domain = None
    creation_time: int | None = None
    disks: list[CheckpointDisk] = []
    for tag, child in children_once(el):  # comments and PIs match no branch
        if tag == "disks":
            disks.extend(disk for _, disk in parse_disks(child, _parse_disk))
        elif tag == "name":
            name = child.text or ""
            if T.checkpoint_name(name) is None:
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
    return CheckpointDef(name, description, disks, creation_time, parent, domain)


_KINDS = {k.value: k for k in CheckpointKind}


def _parse_disk(el: etree._Element) -> CheckpointDisk:
    get = el.get
    value = get("checkpoint")
    kind = None
    if value is not None:
        kind = _KINDS.get(value)
        if kind is None:
            choice(el, "checkpoint", value, _KINDS)  # raises
    bitmap = get("bitmap")
    size = get("size")
    if kind is CheckpointKind.NO:
        for attr, value in (("bitmap", bitmap), ("size", size)):
            if value is not None:
                fail(el, "only a disk with checkpoint='bitmap' has a bitmap", attr)
    name = get("name", "")
    if T.disk_dev(name) is None and T.abs_path(name) is None:
        T.check(el, "name", name, "diskTargetDev", "absFilePath")
    if bitmap == "":
        T.check(el, "bitmap", bitmap, "nonEmpty")
    return CheckpointDisk(name, kind, bitmap, int(size) if size is not None else None)


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
