"""Loading and composing the packaged RelaxNG schemas.

The files under ``schemas/`` are real grammars (usable with xmllint), but jobcore never
lets libxml2 resolve ``<include>``: it reads the packaged files itself and merges their
``<define>``s into one in-memory grammar, so compiling a schema touches no path or URL
taken from input.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable
from importlib import resources

from lxml import etree

RNG_NS = "http://relaxng.org/ns/structure/1.0"
XSD_TYPES = "http://www.w3.org/2001/XMLSchema-datatypes"
_R = f"{{{RNG_NS}}}"


@functools.cache
def _module_root(name: str) -> etree._Element:
    text = resources.files("jobcore.xml").joinpath("schemas", name).read_bytes()
    return etree.fromstring(text, etree.XMLParser(no_network=True, resolve_entities=False))


def module_defines(name: str) -> list[etree._Element]:
    """The ``<define>`` elements of a packaged grammar file, without its includes."""
    return [d for d in _module_root(name) if d.tag == f"{_R}define"]


def _with_datatypes(define: etree._Element) -> etree._Element:
    """A copy of ``define`` that names the XSD datatype library explicitly (the attribute
    is inherited in the file it came from, not in the grammar it is moved to)."""
    copy = etree.fromstring(etree.tostring(define))
    copy.set("datatypeLibrary", XSD_TYPES)
    return copy


def defines_text(*modules: str, only: Iterable[str] | None = None) -> str:
    """The defines of packaged files as a RelaxNG fragment string (a codec's ``schema``)."""
    wanted = None if only is None else set(only)
    parts = [
        etree.tostring(_with_datatypes(d), encoding="unicode")
        for m in modules
        for d in module_defines(m)
        if wanted is None or d.get("name") in wanted
    ]
    return "\n".join(parts)


def fragment_defines(fragment: str) -> list[etree._Element]:
    """Parse a codec's schema fragment (one or more ``<define>``s, RelaxNG namespace
    implied) into define elements."""
    wrapped = f"<grammar xmlns='{RNG_NS}' datatypeLibrary='{XSD_TYPES}'>{fragment}</grammar>"
    root = etree.fromstring(
        wrapped.encode(), etree.XMLParser(no_network=True, resolve_entities=False)
    )
    return [_with_datatypes(d) for d in root if d.tag == f"{_R}define"]


class Schema:
    """A compiled grammar, plus (compiled on first use) its diagnostic twin.

    libxml2 reports a failure inside ``<interleave>`` only as "Extra element X in
    interleave" on the parent. The twin reads every interleave as ``zeroOrMore(choice)``,
    which libxml2 validates child by child, so after a failure it names the element (and
    line) at fault; it is never used to accept a document.

    libxml2 tries the ``<value>``s of a ``<choice>`` one by one, in order; the twin lists
    the values of ``COMMON_VALUES`` first (a choice is unordered: the same documents are
    accepted). A driver type ``qcow2`` was the 15th of 17 formats: 0.4 µs a ``<driver>``.
    """

    def __init__(self, grammar: etree._Element, fast: bool = False) -> None:
        self._grammar = grammar
        self._diagnostic: etree.RelaxNG | None = None
        self._allowed: dict[tuple[str, str], tuple[str, ...]] = {}
        #: ``fast``: enforce the twin itself (validates faster than the interleaves) and
        #: leave "at most once" and "required" children to the parser (built-in types)
        self.rng = self.diagnostic() if fast else etree.RelaxNG(grammar)

    def diagnostic(self) -> etree.RelaxNG:
        if self._diagnostic is None:
            grammar = etree.fromstring(etree.tostring(self._grammar))
            defines = {d.get("name", ""): d for d in grammar.iter(f"{_R}define")}
            for choice in grammar.iter(f"{_R}choice"):
                _common_values_first(choice)
            for node in list(grammar.iter(f"{_R}interleave")):
                if _has_attributes(node, defines, set()):
                    continue  # attributes may not repeat: leave attribute interleaves
                node.tag = f"{_R}zeroOrMore"
                choice = etree.SubElement(node, f"{_R}choice")
                for child in list(node):
                    if child is not choice:
                        choice.append(child)
            self._diagnostic = etree.RelaxNG(grammar)
        return self._diagnostic

    def allowed_values(self, element: str, attr: str) -> tuple[str, ...]:
        """The values attribute ``attr`` of ``<element>`` may take, when the grammar lists
        them (a ``<choice>`` of ``<value>``s); empty when it takes free text."""
        key = (element, attr)
        found = self._allowed.get(key)
        if found is None:
            defines = {d.get("name", ""): d for d in self._grammar.iter(f"{_R}define")}
            values: list[str] = []
            for el in self._grammar.iter(f"{_R}element"):
                if el.get("name") != element:
                    continue
                for pattern in _own(el, f"{_R}attribute", defines, set()):
                    if pattern.get("name") == attr:
                        listed = _values(pattern, defines, set())
                        if listed is None:
                            values = []
                            break
                        values += listed
            found = self._allowed[key] = tuple(dict.fromkeys(values))
        return found


#: values most documents use, tried first by a compiled grammar's choices (see Schema)
COMMON_VALUES = ("qcow2", "raw")


def _common_values_first(choice: etree._Element) -> None:
    """Move the ``<value>``s of ``choice`` that are COMMON_VALUES to its front."""
    if not all(child.tag == f"{_R}value" for child in choice):
        return
    common = [v for v in choice if (v.text or "").strip() in COMMON_VALUES]
    common.sort(key=lambda v: COMMON_VALUES.index((v.text or "").strip()))
    for at, value in enumerate(common):
        choice.insert(at, value)


def _own(
    pattern: etree._Element, tag: str, defines: dict[str, etree._Element], seen: set[str]
) -> list[etree._Element]:
    """The ``tag`` patterns of the element ``pattern`` itself (refs followed, nested
    elements not entered)."""
    out: list[etree._Element] = []
    for child in pattern:
        if child.tag == tag:
            out.append(child)
        elif child.tag == f"{_R}ref":
            name = child.get("name", "")
            if name not in seen and name in defines:
                seen.add(name)
                out += _own(defines[name], tag, defines, seen)
        elif child.tag != f"{_R}element":
            out += _own(child, tag, defines, seen)
    return out


def _values(
    pattern: etree._Element, defines: dict[str, etree._Element], seen: set[str]
) -> list[str] | None:
    """The ``<value>``s a pattern is a choice of, or None when it takes anything else."""
    out: list[str] = []
    for child in pattern:
        tag = child.tag
        if tag == f"{_R}value":
            out.append((child.text or "").strip())
        elif tag == f"{_R}choice":
            inner = _values(child, defines, seen)
            if inner is None:
                return None
            out += inner
        elif tag == f"{_R}ref" and child.get("name", "") in defines:
            name = child.get("name", "")
            if name in seen:
                continue
            seen.add(name)
            inner = _values(defines[name], defines, seen)
            if inner is None:
                return None
            out += inner
        elif isinstance(tag, str):  # data, text, anything open-ended
            return None
    return out


def _has_attributes(
    pattern: etree._Element, defines: dict[str, etree._Element], seen: set[str]
) -> bool:
    """Does ``pattern`` match attributes of the element it sits in (refs followed)?"""
    for child in pattern:
        tag = child.tag
        if tag == f"{_R}attribute":
            return True
        if tag == f"{_R}element":
            continue
        if tag == f"{_R}ref":
            name = child.get("name", "")
            if name not in seen and name in defines:
                seen.add(name)
                if _has_attributes(defines[name], defines, seen):
                    return True
        elif _has_attributes(child, defines, seen):
            return True
    return False


def compose(
    start: etree._Element,
    defines: Iterable[etree._Element],
    relaxed: frozenset[str] = frozenset(),
    fast: bool = False,
) -> Schema:
    """Compile a grammar of ``start`` (a RelaxNG pattern) and ``defines``; a define name
    given twice must have the same content. Defines named in ``relaxed`` match any text
    (their values are checked by the caller: see jobcore.xml._types)."""
    grammar = etree.fromstring(f"<grammar xmlns='{RNG_NS}' datatypeLibrary='{XSD_TYPES}'/>")
    etree.SubElement(grammar, f"{_R}start").append(start)
    seen: dict[str, bytes] = {}
    for d in defines:
        name = d.get("name", "")
        body = etree.tostring(d)
        if name in seen:
            if seen[name] != body:
                raise ValueError(f"RelaxNG define '{name}' is given twice, differently")
            continue
        seen[name] = body
        copy = etree.fromstring(body)
        if name in relaxed:
            for child in list(copy):
                copy.remove(child)
            etree.SubElement(copy, f"{_R}text")
        grammar.append(copy)
    return Schema(grammar, fast)


def ref(name: str) -> etree._Element:
    el = etree.Element(f"{_R}ref")
    el.set("name", name)
    return el


def base_defines() -> list[etree._Element]:
    """Defines every jobcore grammar has: the shared datatypes and the job-common ones."""
    return [
        _with_datatypes(d)
        for m in ("types.rng", "jobtypes.rng")
        for d in module_defines(m)
        if m == "types.rng"
        or not d.get("name", "").startswith(
            ("job-backup", "job-blockpull", "job-blockcommit", "job-migration")
        )
    ]


_local = threading.local()


def document_schema(root: str, modules: tuple[str, ...], relaxed: frozenset[str]) -> Schema:
    """The compiled, per-thread-cached schema of a standalone document ``<root>``."""
    cache: dict[str, Schema] | None = getattr(_local, "documents", None)
    if cache is None:
        cache = _local.documents = {}
    schema = cache.get(root)
    if schema is None:
        defines = [_with_datatypes(d) for m in ("types.rng", *modules) for d in module_defines(m)]
        schema = cache[root] = compose(ref(root), defines, relaxed, fast=True)
    return schema
