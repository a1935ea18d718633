"""The universal ``<job type='…'>`` document, and the standalone backup/checkpoint ones.

``parse_job`` reads the type, looks it up in ``jobcore.registry.registry``, validates the
document once against that type's compiled grammar (common children interleaved with the
type's ``job-TYPE`` define; compiled per thread and rebuilt when the type's registration
changes), parses the common children (uuid, queue, priority, retention) and hands the
element to the type's codec.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from lxml import etree

from jobcore.backup import BackupDef, CheckpointDef
from jobcore.errors import JobError, XMLError
from jobcore.registry import JobTypeInfo, registry
from jobcore.spec import MAX_INT64, MAX_SECONDS, ChainRef, JobOptions
from jobcore.xml import _schema
from jobcore.xml import _types as T
from jobcore.xml._parse import MAX_DOCUMENT_BYTES, choice, fail, once, parse_document, validate
from jobcore.xml._types import RELAXED
from jobcore.xml._write import serialize
from jobcore.xml.backup import build_backup_element, parse_backup_element
from jobcore.xml.checkpoint import build_checkpoint_element, parse_checkpoint_element

_A = TypeVar("_A")
_R = TypeVar("_R")

#: children of <job> that jobcore.xml parses itself, whatever the type
COMMON_CHILDREN = frozenset({"uuid", "state", "queue", "priority", "retention"})

#: bandwidth units -> bytes/s multiplier
BANDWIDTH_UNITS = {"bytes/s": 1, "B/s": 1, "KiB/s": 1 << 10, "MiB/s": 1 << 20, "GiB/s": 1 << 30}
_FORMAT_UNITS = (("GiB/s", 1 << 30), ("MiB/s", 1 << 20), ("KiB/s", 1 << 10))
#: the largest bandwidth after conversion, in bytes/s (QEMU's int64 ``speed``)
MAX_BANDWIDTH = MAX_INT64
#: the largest ``<downtime-limit>`` after conversion, in ms
MAX_DOWNTIME_MS = MAX_INT64


# --- standalone documents --------------------------------------------------------------


def parse_backup(doc: str | bytes) -> BackupDef:
    """A ``<domainbackup>`` document -> BackupDef (nothing aligned: see align_backup)."""
    return _guarded(_parse_backup, doc)


def _parse_backup(doc: str | bytes, max_bytes: int | None = MAX_DOCUMENT_BYTES) -> BackupDef:
    el = parse_document(doc, "domainbackup", max_bytes)
    validate(_schema.document_schema("domainbackup", ("backup.rng",), RELAXED), el, "domainbackup")
    return parse_backup_element(el)


def format_backup(defn: BackupDef) -> str:
    return _guarded(
        lambda d: _self_checked(serialize(build_backup_element(d)), _parse_backup), defn
    )


def parse_checkpoint(doc: str | bytes) -> CheckpointDef:
    """A ``<domaincheckpoint>`` document (creation or redefinition) -> CheckpointDef."""
    return _guarded(_parse_checkpoint, doc)


def _parse_checkpoint(
    doc: str | bytes, max_bytes: int | None = MAX_DOCUMENT_BYTES
) -> CheckpointDef:
    el = parse_document(doc, "domaincheckpoint", max_bytes)
    validate(
        _schema.document_schema("domaincheckpoint", ("checkpoint.rng",), RELAXED),
        el,
        "domaincheckpoint",
    )
    return parse_checkpoint_element(el)


def format_checkpoint(defn: CheckpointDef) -> str:
    return _guarded(
        lambda d: _self_checked(serialize(build_checkpoint_element(d)), _parse_checkpoint), defn
    )


def _self_checked(text: str, parse: Callable[[str, int | None], object]) -> str:
    """``text`` if its own parser accepts it: a spec that breaks a rule of the format
    (e.g. an export name in push mode) fails here, not in whoever reads it back. The input
    size limit is not applied: formatting may make a document larger than its input."""
    try:
        parse(text, None)
    except XMLError as exc:
        raise XMLError(f"cannot format: the document would be refused: {exc}") from None
    return text


def _guarded(fn: Callable[[_A], _R], arg: _A) -> _R:
    """Run ``fn(arg)``; the errors bad input causes become an XMLError. Anything else (an
    AttributeError, an assertion, memory exhaustion) is a bug or a crisis, not bad input,
    and is raised as it is."""
    try:
        return fn(arg)
    except XMLError:
        raise
    except JobError as exc:
        raise XMLError(str(exc)) from None
    except (ValueError, etree.LxmlError) as exc:  # a value the spec or lxml refuses
        raise XMLError(f"refused: {exc}") from None


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
    # only the built-in parsers check the relaxed datatypes themselves
    from jobcore.xml import codecs

    builtin = isinstance(info.codec, codecs.BUILTIN_CODEC_CLASSES)
    compiled = _schema.compose(
        start,
        [*_schema.base_defines(), *_schema.fragment_defines(schema_text)],
        RELAXED if builtin else frozenset(),
        fast=builtin,
    )
    cache[name] = (info.codec, schema_text, compiled)
    return compiled


# --- common children -------------------------------------------------------------------


def parse_seconds(el: etree._Element, attr: str) -> float:
    value = float(T.check(el, attr, el.get(attr, ""), "seconds"))
    if not math.isfinite(value):
        fail(el, "must be a finite number of seconds", attr)
    if value > MAX_SECONDS:
        fail(el, f"{value:g} s is too long: the maximum is {MAX_SECONDS:.0f} s", attr)
    return value


def format_seconds(value: float) -> str:
    """Shortest text that reads back as the same float: '30', '2.5', '1e-05'."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _parse_common(job: etree._Element) -> tuple[uuid.UUID | None, JobOptions]:
    job_uuid = None
    queue = False
    timeout = retention = None
    priority = 0
    seen: set[str] = set()
    for child in job.iterchildren(*COMMON_CHILDREN):
        once(seen, child)
        tag = child.tag
        if tag == "uuid":
            try:
                job_uuid = uuid.UUID((child.text or "").strip())
            except ValueError:
                fail(child, f"'{child.text}' is not a UUID")
        elif tag == "queue":
            queue = True
            if child.get("timeout") is not None:
                timeout = parse_seconds(child, "timeout")
        elif tag == "state":
            pass  # read-only: a described job's state, as JobGetXMLDesc writes it
        elif tag == "priority":
            priority = int(child.text or "")
        else:
            retention = parse_seconds(child, "seconds")
    try:
        options = JobOptions(
            queue=queue, queue_timeout=timeout, priority=priority, retention=retention
        )
    except ValueError as exc:
        fail(job, str(exc))
    return job_uuid, options


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


# --- helpers for type codecs -------------------------------------------------------------


def parse_bandwidth(el: etree._Element) -> int:
    """``<bandwidth unit='…'>N</bandwidth>`` -> bytes/s."""
    factor = choice(el, "unit", el.get("unit", "bytes/s"), BANDWIDTH_UNITS)
    assert factor is not None
    value = int(el.text or "") * factor
    if value > MAX_BANDWIDTH:
        fail(el, f"{value} bytes/s is too large: the maximum is {MAX_BANDWIDTH} bytes/s")
    return value


def parse_downtime(el: etree._Element) -> int:
    """``<downtime-limit unit='ms|s'>N</downtime-limit>`` -> milliseconds."""
    factor = 1000 if el.get("unit") == "s" else 1
    value = int(el.text or "") * factor
    if value > MAX_DOWNTIME_MS:
        fail(el, f"{value} ms is too large: the maximum is {MAX_DOWNTIME_MS} ms")
    return value


def build_bandwidth(parent: etree._Element, value: int, tag: str = "bandwidth") -> None:
    """bytes/s -> ``<bandwidth>`` in the largest unit that holds it exactly."""
    unit = "bytes/s"
    number = value
    for name, factor in _FORMAT_UNITS:
        if value and value % factor == 0:
            unit, number = name, value // factor
            break
    el = etree.SubElement(parent, tag)
    el.set("unit", unit)
    el.text = str(number)


def parse_chain_ref(el: etree._Element) -> ChainRef:
    index = el.get("index")
    if index is not None:
        return ChainRef(index=int(index))
    return ChainRef(file=T.attr(el, "file", "nonEmpty"))


def build_chain_ref(parent: etree._Element, tag: str, ref: ChainRef) -> None:
    el = etree.SubElement(parent, tag)
    if ref.index is not None:
        el.set("index", str(ref.index))
    else:
        el.set("file", ref.file or "")


# --- <job> ---------------------------------------------------------------------------------


def parse_job(doc: str | bytes) -> Any:
    """A ``<job type='…'>`` document -> the type's spec (e.g. BackupJobSpec)."""
    return _guarded(_parse_job, doc)


def _parse_job(doc: str | bytes, max_bytes: int | None = MAX_DOCUMENT_BYTES) -> Any:
    job = parse_document(doc, "job", max_bytes)
    type_name = job.get("type")
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
    """A spec -> its canonical ``<job>`` document; ``state`` adds the read-only
    ``<state>`` element of a described job (JobGetXMLDesc)."""
    return _guarded(lambda s: _format_job(s, state), spec)


def _format_job(spec: Any, state: str | None = None) -> str:
    try:
        info = registry.for_spec(spec)
    except JobError:
        raise XMLError(f"<job>: no job type is registered for {type(spec).__name__}") from None
    job = etree.Element("job")
    job.set("type", str(info.type))
    _format_common(job, spec.uuid, spec.options, state)
    info.codec.format(spec, job)
    return _self_checked(serialize(job), _parse_job)


__all__ = [
    "BANDWIDTH_UNITS",
    "COMMON_CHILDREN",
    "build_backup_element",
    "build_bandwidth",
    "build_chain_ref",
    "build_checkpoint_element",
    "format_backup",
    "format_checkpoint",
    "format_job",
    "format_seconds",
    "job_schema",
    "parse_backup",
    "parse_backup_element",
    "parse_bandwidth",
    "parse_chain_ref",
    "parse_checkpoint",
    "parse_checkpoint_element",
    "parse_downtime",
    "parse_job",
    "parse_seconds",
]
