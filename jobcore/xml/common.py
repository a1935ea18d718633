"""What every job type's codec shares, below the job types: values of the ``<job>``
children (bandwidth, chain positions, seconds, downtime), the spec check, the record of
specs known to round-trip, and the guards every public parse/format function runs in (bad
input becomes an XMLError). Knows no job type and no registry (jobcore.xml.job resolves
types; design/xml.md)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from lxml import etree

from jobcore.errors import JobError, XMLError
from jobcore.spec import MAX_INT64, MAX_SECONDS, ChainRef
from jobcore.xml import _types as T
from jobcore.xml._parse import choice, fail

_A = TypeVar("_A")
_R = TypeVar("_R")

#: bandwidth units -> bytes/s multiplier
BANDWIDTH_UNITS = {"bytes/s": 1, "B/s": 1, "KiB/s": 1 << 10, "MiB/s": 1 << 20, "GiB/s": 1 << 30}
_FORMAT_UNITS = (("GiB/s", 1 << 30), ("MiB/s", 1 << 20), ("KiB/s", 1 << 10))
#: the largest bandwidth after conversion, in bytes/s (QEMU's int64 ``speed``)
MAX_BANDWIDTH = MAX_INT64
#: the largest ``<downtime-limit>`` after conversion, in ms
MAX_DOWNTIME_MS = MAX_INT64


#: id(spec) -> a weak reference to it, for the specs whose canonical document is known to
#: parse again: what parse_job returned (the codecs format a parsed spec as a document their
#: parser accepts; tests/test_xml_roundtrip.py checks it), and specs derived from
#: one by a rule that keeps that (round_trips_as). An entry goes with its spec.
_ROUND_TRIPS: dict[int, weakref.ref[Any]] = {}


def _forget(key: int, ref: weakref.ref[Any]) -> None:
    if _ROUND_TRIPS.get(key) is ref:  # not a newer spec that got the same id
        del _ROUND_TRIPS[key]


def prove_round_trip(spec: Any) -> None:
    """Record that ``spec``'s canonical document parses again (parse_job's result)."""
    key = id(spec)
    _ROUND_TRIPS[key] = weakref.ref(spec, lambda ref: _forget(key, ref))


def round_trips(spec: Any) -> bool:
    """Whether ``spec``'s canonical document is known to parse again (format_job then
    skips its self-check)."""
    ref = _ROUND_TRIPS.get(id(spec))
    return ref is not None and ref() is spec


def round_trips_as(derived: Any, source: Any) -> Any:
    """``derived``, known to round-trip if ``source`` is: for a spec made from ``source``
    by a change that cannot break the format (a new UUID, a flag outside the document, a
    job type's prepare that only fills in what its parser accepts). Returns ``derived``."""
    if round_trips(source):
        prove_round_trip(derived)
    return derived


def self_checked(text: str, parse: Callable[[str, int | None], object]) -> str:
    """``text`` if its own parser accepts it: a spec that breaks a rule of the format
    (e.g. an export name in push mode) fails here, not in whoever reads it back. The input
    size limit is not applied: formatting may make a document larger than its input."""
    try:
        parse(text, None)
    except XMLError as exc:
        raise XMLError(f"cannot format: the document would be refused: {exc}") from None
    return text


def guarded(fn: Callable[[_A], _R], arg: _A) -> _R:
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


#: spec class -> which of <disk>, <destination> it requires (looked up once per class)
_REQUIRED: dict[type[Any], tuple[str, ...]] = {}


def checked_spec(job: etree._Element, spec_class: type[Any], **values: Any) -> Any:
    """``spec_class(**values)``, its refusals as an XMLError naming the ``<job>``."""
    required = _REQUIRED.get(spec_class)
    if required is None:
        fields = spec_class.__init__.__annotations__
        required = _REQUIRED[spec_class] = tuple(
            name for name in ("disk", "destination") if name in fields
        )
    for name in required:
        if name not in values:
            fail(job, f"a {job.get('type')} job needs a <{name}>")
    try:
        return spec_class(**values)
    except (ValueError, TypeError) as exc:
        fail(job, str(exc))


def build_flag(parent: etree._Element, tag: str, on: bool) -> None:
    """An empty flag element (``<pivot/>``) when ``on``."""
    if on:
        etree.SubElement(parent, tag)


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


def parse_bandwidth(el: etree._Element) -> int:
    """``<bandwidth unit='…'>N</bandwidth>`` -> bytes/s."""
    factor = choice(el, "unit", el.get(b"unit", "bytes/s"), BANDWIDTH_UNITS)
    assert factor is not None
    value = int(el.text or "") * factor
    if value > MAX_BANDWIDTH:
        fail(el, f"{value} bytes/s is too large: the maximum is {MAX_BANDWIDTH} bytes/s")
    return value


def parse_downtime(el: etree._Element) -> int:
    """``<downtime-limit unit='ms|s'>N</downtime-limit>`` -> milliseconds."""
    factor = 1000 if el.get(b"unit") == "s" else 1
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
    index = el.get(b"index")
    if index is not None:
        return ChainRef(index=int(index))
    return ChainRef(file=T.attr(el, "file", "nonEmpty"))


def build_chain_ref(parent: etree._Element, tag: str, ref: ChainRef) -> None:
    el = etree.SubElement(parent, tag)
    if ref.index is not None:
        el.set("index", str(ref.index))
    else:
        el.set("file", ref.file or "")
