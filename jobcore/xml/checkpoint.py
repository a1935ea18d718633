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
from jobcore.xml._parse import check_depth, choice, fail, once, parse_document
from jobcore.xml._write import serialize

_ELEMENT = etree.Element


def parse_checkpoint_element(el: etree._Element) -> CheckpointDef:
    """A schema-valid ``<domaincheckpoint>`` element -> CheckpointDef."""
    name = description = parent = domain = None
    creation_time: int | None = None
    disks: list[CheckpointDisk] = []
    top: set[str] = set()
    for child in el.iterchildren(_ELEMENT):
        once(top, child)
        tag = child.tag
        if tag == "name":
            name = T.text(child, "checkpointName")
        elif tag == "description":
            description = child.text or None
        elif tag == "parent":
            parent = T.text(child[0], "checkpointName")
        elif tag == "creationTime":
            creation_time = int(child.text or "")
        elif tag == "disks":
            seen: set[str] = set()
            for disk_el in child.iterchildren(_ELEMENT):
                disk = _parse_disk(disk_el)
                if disk.name in seen:
                    fail(disk_el, f"disk '{disk.name}' is named twice")
                seen.add(disk.name)
                disks.append(disk)
        elif tag == "domain":
            domain = _domain_text(child)
    return CheckpointDef(
        name=name,
        description=description,
        disks=tuple(disks),
        creation_time=creation_time,
        parent=parent,
        domain=domain,
    )


_KINDS = {k.value: k for k in CheckpointKind}


def _parse_disk(el: etree._Element) -> CheckpointDisk:
    kind = choice(el, "checkpoint", el.get("checkpoint"), _KINDS)
    if kind is CheckpointKind.NO:
        for attr in ("bitmap", "size"):
            if el.get(attr) is not None:
                fail(el, "only a disk with checkpoint='bitmap' has a bitmap", attr)
    size = el.get("size")
    return CheckpointDisk(
        name=T.check(el, "name", el.get("name", ""), "diskTargetDev", "absFilePath"),
        checkpoint=kind,
        bitmap=T.attr(el, "bitmap", "nonEmpty"),
        size=int(size) if size is not None else None,
    )


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
