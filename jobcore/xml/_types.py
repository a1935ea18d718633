"""The string datatypes of ``types.rng``, checked in Python.

libxml2 recompiles a ``<param name='pattern'>`` (and builds a facet for ``minLength``)
every time it checks a value, which made validation 4x slower than parsing. The
built-in grammars are therefore compiled with these datatypes relaxed to ``<text/>``,
and the parsers check each value here, against the very patterns written in types.rng,
naming the element, the attribute and the line.
"""

from __future__ import annotations

import functools
import re

from lxml import etree

from jobcore.xml._parse import fail
from jobcore.xml._schema import RNG_NS, module_defines

#: types.rng defines that the built-in grammars relax and the parsers check
RELAXED = frozenset(
    {
        "nonEmpty",
        "absFilePath",
        "diskTargetDev",
        "hostName",
        "secretUUID",
        "seconds",
        "checkpointName",
    }
)

_WHAT = {
    "nonEmpty": "non-empty string",
    "absFilePath": "absolute path",
    "diskTargetDev": "disk target name",
    "hostName": "host name or address",
    "secretUUID": "UUID",
    "seconds": "number of seconds",
    "checkpointName": "checkpoint name",
}


@functools.cache
def _regex(kind: str) -> re.Pattern[str]:
    """The define's XSD patterns as one Python regex (XSD patterns are anchored)."""
    define = next(d for d in module_defines("types.rng") if d.get("name") == kind)
    patterns = [
        p.text or "" for p in define.iter(f"{{{RNG_NS}}}param") if p.get("name") == "pattern"
    ]
    if not patterns:  # minLength 1
        return re.compile(r"(?s).+")
    return re.compile("|".join(f"(?:{_xsd_to_python(p)})" for p in patterns))


def _xsd_to_python(pattern: str) -> str:
    """XSD regex -> Python: the only difference our patterns meet is that XSD's '.' does
    not match CR or LF."""
    out: list[str] = []
    escaped = in_class = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[":
            in_class = True
        elif char == "]":
            in_class = False
        elif char == "." and not in_class:
            out.append("[^\\n\\r]")
            continue
        out.append(char)
    return "".join(out)


_MATCH = {kind: _regex(kind).fullmatch for kind in RELAXED}

# The bare matchers (a match, or None) of the datatypes the parsers meet on every job, for
# their hot paths: a value that does not match goes through ``check``, which says why.
# ``nonEmpty`` needs none: it is ``value != ""``.
disk_dev = _MATCH["diskTargetDev"]
abs_path = _MATCH["absFilePath"]
host_name = _MATCH["hostName"]
checkpoint_name = _MATCH["checkpointName"]


def check(el: etree._Element, attr: str | None, value: str, *kinds: str) -> str:
    """``value`` (of ``attr``, or of the element's text) if it matches one of ``kinds``."""
    for kind in kinds:
        if _MATCH[kind](value):
            return value
    what = " or ".join(_WHAT[k] for k in kinds)
    fail(el, f"'{value[:80]}' is not a valid {what}", attr)


def valid(value: str, kind: str) -> bool:
    """Whether ``value`` is a valid ``kind`` (one of RELAXED), as the parsers check it."""
    return _MATCH[kind](value) is not None


def attr(el: etree._Element, name: str, *kinds: str) -> str | None:
    """Attribute ``name`` of ``el``, checked, or None when absent."""
    value = el.get(name)
    return None if value is None else check(el, name, value, *kinds)


def text(el: etree._Element, *kinds: str) -> str:
    return check(el, None, el.text or "", *kinds)
