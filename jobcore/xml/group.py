"""The ``<jobgroup>`` document: several ``<job>``s begun as one (design/scheduling.md
"Job groups").

::

    <jobgroup mode='all-or-nothing'>          <!-- or 'independent' -->
      <uuid>…</uuid>                          <!-- optional: the group's own UUID -->
      <queue/>                                <!-- optional: all queued rather than refused -->
      <job type='backup' domain='vm1'>…</job> <!-- 1…MAX_GROUP_MEMBERS members -->
      <job type='backup' domain='vm2'>…</job>
    </jobgroup>

The grammar (``schemas/jobgroup.rng``) checks the group's shape; each member, its
``domain`` attribute removed, is then exactly a ``<job>`` document of its type and is
parsed by ``jobcore.xml.job.parse_job`` (its type's grammar and codec, through the
registry): this module knows nothing of any job type. Hostile input is refused as for
``<job>`` (no DTD or entities, at most 1 MiB, bounded depth, at most
``MAX_GROUP_MEMBERS`` members).
"""

from __future__ import annotations

import enum
import uuid
from typing import Any

from attrs import field, frozen
from lxml import etree

from jobcore.errors import XMLError
from jobcore.xml import _schema
from jobcore.xml._parse import (
    MAX_DOCUMENT_BYTES,
    check_depth,
    choice,
    fail,
    line_of,
    once,
    parse_document,
    validate,
)
from jobcore.xml._write import serialize
from jobcore.xml.common import guarded
from jobcore.xml.job import format_job, parse_job

#: members one group may hold (each is a job: admission and its records are per member)
MAX_GROUP_MEMBERS = 64
#: longest domain name a member may name
MAX_DOMAIN_NAME = 256


class GroupMode(enum.StrEnum):
    #: a member that fails or is cancelled cancels the others; completions wait for all
    ALL_OR_NOTHING = "all-or-nothing"
    #: members run on their own once begun (admission is still all or none)
    INDEPENDENT = "independent"


_MODES = {m.value: m for m in GroupMode}


@frozen
class GroupMember:
    """One member: the domain it runs on and its job's spec (its type's spec class)."""

    domain: str
    spec: Any


def _check_members(_: object, __: object, members: tuple[GroupMember, ...]) -> None:
    if not 1 <= len(members) <= MAX_GROUP_MEMBERS:
        raise ValueError(f"a job group has 1…{MAX_GROUP_MEMBERS} members, not {len(members)}")
    for m in members:
        if not m.domain or len(m.domain) > MAX_DOMAIN_NAME:
            raise ValueError(f"a member's domain name has 1…{MAX_DOMAIN_NAME} characters")


@frozen
class JobGroupSpec:
    """What ``<jobgroup>`` parses into."""

    mode: GroupMode
    members: tuple[GroupMember, ...] = field(validator=_check_members)
    uuid: uuid.UUID | None = None
    #: queue every member (all together) when one cannot be admitted now
    queue: bool = False


def _schema_of() -> _schema.Schema:
    return _schema.document_schema("jobgroup", ("jobgroup.rng",), frozenset())


def parse_group(doc: str | bytes) -> JobGroupSpec:
    """A ``<jobgroup>`` document -> JobGroupSpec; XMLError naming the element (and for a
    member's own fault, the member: its position, type and domain) otherwise."""
    return guarded(_parse_group, doc)


def _parse_group(doc: str | bytes, max_bytes: int | None = MAX_DOCUMENT_BYTES) -> JobGroupSpec:
    root = parse_document(doc, "jobgroup", max_bytes)
    check_depth(root)
    members_seen = sum(1 for c in root.iterchildren("job"))
    if members_seen > MAX_GROUP_MEMBERS:  # before validating (and parsing) any of them
        fail(root, f"{members_seen} members: a job group holds at most {MAX_GROUP_MEMBERS}")
    validate(_schema_of(), root, "jobgroup")
    mode = choice(root, "mode", root.get("mode"), _MODES)
    assert mode is not None  # the grammar requires it
    group_uuid: uuid.UUID | None = None
    queue = False
    members: list[GroupMember] = []
    seen: set[str] = set()
    for child in root.iterchildren(etree.Element):
        if child.tag != "job":
            once(seen, child)
        if child.tag == "uuid":
            try:
                group_uuid = uuid.UUID((child.text or "").strip())
            except ValueError:
                fail(child, f"'{child.text}' is not a UUID")
        elif child.tag == "queue":
            queue = True
        else:
            members.append(_parse_member(child, len(members) + 1))
    if not members:
        fail(root, "a job group needs at least one member <job type='…' domain='…'>")
    return JobGroupSpec(mode, tuple(members), group_uuid, queue)


def _parse_member(el: etree._Element, index: int) -> GroupMember:
    domain = el.get("domain", "")
    job = etree.Element("job")
    for key, value in el.attrib.items():
        if key != "domain":
            job.set(key, value)
    job.text = el.text
    for sub in el:
        job.append(_copy(sub))
    try:
        spec = parse_job(etree.tostring(job))
    except XMLError as exc:
        # the member's own line numbers count from its <job>: the group's line is given
        message = str(exc) if exc.line is None else str(exc).removesuffix(f" (line {exc.line})")
        where = f"member {index} <job type='{el.get('type')}' domain='{domain[:80]}'>"
        raise XMLError(f"<jobgroup> {where}: {message}", line=line_of(el)) from None
    return GroupMember(domain, spec)


def _copy(el: etree._Element) -> etree._Element:
    return etree.fromstring(etree.tostring(el))


def format_group(spec: JobGroupSpec) -> str:
    """A JobGroupSpec -> its canonical ``<jobgroup>`` document (parsed again before it is
    returned, as ``format_job`` checks specs it cannot vouch for)."""
    return guarded(_format_group, spec)


def _format_group(spec: JobGroupSpec) -> str:
    root = etree.Element("jobgroup")
    root.set("mode", str(spec.mode))
    if spec.uuid is not None:
        etree.SubElement(root, "uuid").text = str(spec.uuid)
    if spec.queue:
        etree.SubElement(root, "queue")
    for m in spec.members:
        job = etree.fromstring(format_job(m.spec).encode())
        member = etree.SubElement(root, "job")
        member.set("type", job.get("type", ""))
        member.set("domain", m.domain)
        for sub in job:
            member.append(sub)
    text = serialize(root)
    _parse_group(text, None)  # a spec built in Python may break a rule of the format
    return text


__all__ = [
    "MAX_GROUP_MEMBERS",
    "GroupMember",
    "GroupMode",
    "JobGroupSpec",
    "format_group",
    "parse_group",
]
