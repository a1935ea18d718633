"""The universal ``<job type='…'>`` document.

``parse_job`` reads the type, looks it up in ``jobcore.registry.registry``, validates the
document once against that type's compiled grammar (common children interleaved with the
type's ``job-TYPE`` define; compiled per thread and rebuilt when the type's registration
changes), parses the common children (uuid, queue, priority, retention, policy) and hands the
element to the type's codec. This module sits above the registry (and so above every job
type); the helpers the types' codecs use are in jobcore.xml.common, below them.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

from lxml import etree

from jobcore.errors import JobError, XMLError
from jobcore.registry import registry
from jobcore.spec import JobOptions, Policy
from jobcore.types.base import JobTypeInfo
from jobcore.xml import _schema
from jobcore.xml._parse import (
    MAX_DOCUMENT_BYTES,
    fail,
    parse_document,
    repeated,
    trusted,
    validate,
)
from jobcore.xml._types import RELAXED
from jobcore.xml._write import serialize
from jobcore.xml.common import (
    format_seconds,
    guarded,
    parse_seconds,
    prove_round_trip,
    round_trips,
    self_checked,
)

#: children of <job> that jobcore.xml parses itself, whatever the type
COMMON_CHILDREN = frozenset({"uuid", "state", "queue", "priority", "retention", "policy"})


# --- the <job> grammar -----------------------------------------------------------------

_local = threading.local()


def job_schema(info: JobTypeInfo) -> _schema.Schema:
    """The compiled grammar of ``<job type='TYPE'>``, cached per thread and per
    registration (a re-registered type gets a new grammar)."""
    cache: dict[str, tuple[object, str, _schema.Schema]] | None = getattr(_local, "jobs", None)
    if cache is None:
        cache = _local.jobs = {}
    name = str(info.type)
    hit = cache.get(name)
    schema_text = info.codec.schema
    if hit is not None and hit[0] is info.codec and hit[1] == schema_text:
        return hit[2]
    rng = _schema.RNG_NS
    start = etree.fromstring(
        f"<element xmlns='{rng}' name='job'>"
        f"<attribute name='type'><value>{name}</value></attribute>"
        f"<interleave><ref name='job-common'/><ref name='job-{name}'/></interleave>"
        "</element>".encode()
    )
    # only codecs that say so check the relaxed datatypes themselves (the built-in ones)
    relaxed = bool(getattr(info.codec, "checks_datatypes", False))
    compiled = _schema.compose(
        start,
        [*_schema.base_defines(), *_schema.fragment_defines(schema_text)],
        RELAXED if relaxed else frozenset(),
        fast=relaxed,
    )
    cache[name] = (info.codec, schema_text, compiled)
    return compiled


# --- common children -------------------------------------------------------------------


#: the options of a job that writes none (JobOptions is frozen: one value serves all)
_NO_OPTIONS = JobOptions()
_new_options = trusted(JobOptions)


def _parse_common(job: etree._Element) -> tuple[uuid.UUID | None, JobOptions]:
    job_uuid = None
    queue = False
    timeout = retention = None
    priority = 0
    conflict: Policy | None = None
    requeue = False
    seen: set[str] = set()
    options_written = False
    for child in job:
        tag = child.tag
        if tag not in COMMON_CHILDREN:
            continue  # the type's child, or a comment
        if tag in seen:
            repeated(child)
        seen.add(tag)
        if tag == "uuid":
            try:
                job_uuid = uuid.UUID((child.text or "").strip())
            except ValueError:
                fail(child, f"'{child.text}' is not a UUID")
            continue
        if tag == "state":
            continue  # read-only: a described job's state, as JobGetXMLDesc writes it
        options_written = True
        if tag == "queue":
            queue = True
            if child.get(b"timeout") is not None:
                timeout = parse_seconds(child, "timeout")
        elif tag == "priority":
            priority = int(child.text or "")
        elif tag == "policy":
            written = child.get(b"conflict")
            if written is not None:
                conflict = Policy(written)
            requeue = child.get(b"requeue") == "yes"
        else:
            retention = parse_seconds(child, "seconds")
    if not options_written:
        return job_uuid, _NO_OPTIONS
    # JobOptions' validators hold already: the grammar bounds the priority, parse_seconds
    # the seconds (finite, 0 to MAX_SECONDS)
    return job_uuid, _new_options(queue, timeout, priority, retention, conflict, requeue)


def _format_common(
    job: etree._Element, spec_uuid: uuid.UUID | None, options: JobOptions, state: str | None
) -> None:
    if spec_uuid is not None:
        etree.SubElement(job, "uuid").text = str(spec_uuid)
    if state is not None:
        etree.SubElement(job, "state").text = state
    if options.queue:
        q = etree.SubElement(job, "queue")
        if options.queue_timeout is not None:
            q.set("timeout", format_seconds(options.queue_timeout))
    elif options.queue_timeout is not None:
        raise XMLError("<queue>: a queue timeout needs queue=True")
    if options.priority != 0:
        etree.SubElement(job, "priority").text = str(options.priority)
    if options.retention is not None:
        etree.SubElement(job, "retention").set("seconds", format_seconds(options.retention))
    if options.conflict is not None or options.requeue:
        policy = etree.SubElement(job, "policy")
        if options.conflict is not None:
            policy.set("conflict", str(options.conflict))
        if options.requeue:
            policy.set("requeue", "yes")


# --- <job> ---------------------------------------------------------------------------------


def parse_job(doc: str | bytes) -> Any:
    """A ``<job type='…'>`` document -> the type's spec (e.g. BackupJobSpec)."""
    spec = guarded(_parse_job, doc)
    prove_round_trip(spec)
    return spec


def _parse_job(doc: str | bytes, max_bytes: int | None = MAX_DOCUMENT_BYTES) -> Any:
    job = parse_document(doc, "job", max_bytes)
    type_name = job.get(b"type")
    if type_name is None:
        fail(job, "the job type is missing", "type")
    try:
        info = registry.get(type_name)
    except JobError:
        fail(job, f"unknown job type '{type_name}'", "type")
    validate(job_schema(info), job, "job")
    job_uuid, options = _parse_common(job)
    return info.codec.parse(job, job_uuid, options)


def format_job(spec: Any, *, state: str | None = None) -> str:
    """A spec (or a prepared spec: it formats as the job it describes, with its effective
    values) -> its canonical ``<job>`` document; ``state`` adds the read-only
    ``<state>`` element of a described job (JobGetXMLDesc).

    The document is parsed again before it is returned (a spec built in Python may break
    a rule of the format, e.g. an export name in push mode), unless the spec is known to
    round-trip (round_trips)."""
    return guarded(lambda s: _format_job(s, state), spec)


def _format_job(spec: Any, state: str | None = None) -> str:
    try:
        info = registry.for_spec(spec)
    except JobError:
        raise XMLError(f"<job>: no job type is registered for {type(spec).__name__}") from None
    job = etree.Element("job")
    job.set("type", str(info.type))
    _format_common(job, spec.uuid, spec.options, state)
    info.codec.format(spec, job)
    text = serialize(job)  # refuses characters XML cannot hold, checked or not
    if state is None and round_trips(spec):
        return text
    return self_checked(text, _parse_job)


__all__ = ["COMMON_CHILDREN", "format_job", "job_schema", "parse_job"]
