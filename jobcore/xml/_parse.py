"""Hostile-input-safe parsing and validation, and the error shape of jobcore.xml.

Every failure is an ``XMLError`` whose message names the element (and attribute, where
one is at fault) and whose ``line`` is the 1-based source line: ``<disk name='vda'>
attribute 'exportname': requires pull mode (line 7)``.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn, TypeVar

import attrs
from lxml import etree

from jobcore.errors import XMLError
from jobcore.xml._schema import Schema

#: documents larger than this many bytes (UTF-8 for str input) are refused unparsed
MAX_DOCUMENT_BYTES = 1 << 20
#: deepest element nesting accepted anywhere (libxml2 itself stops at 256)
MAX_DEPTH = 64

_local = threading.local()
_V = TypeVar("_V")
_C = TypeVar("_C")


def trusted(cls: type[_C]) -> Callable[..., _C]:
    """A constructor of the frozen, slotted attrs class ``cls`` that takes every field
    positionally, in order, and stores it as given: no converter, validator or
    ``__attrs_post_init__`` runs. For the parsers' hot paths only, where each value has
    passed checks at least as strict (a tuple where a converter would make one); the
    instance is the one ``cls(...)`` would build, so it compares, hashes and prints the same.
    """
    names = [a.name for a in attrs.fields(cls)]  # type: ignore[arg-type]
    setters: dict[str, Any] = {f"_set_{n}": getattr(cls, n).__set__ for n in names}
    body = "".join(f"    _set_{n}(o, {n})\n" for n in names)
    source = f"def make({', '.join(names)}):\n    o = _new(_cls)\n{body}    return o\n"
    scope: dict[str, Any] = {"_new": object.__new__, "_cls": cls, **setters}
    exec(source, scope)  # field names are identifiers attrs accepted
    make: Callable[..., _C] = scope["make"]
    make.__qualname__ = make.__name__ = f"trusted_{cls.__name__}"
    return make


def _parser(forced_utf8: bool) -> etree.XMLParser:
    """The per-thread parser (lxml parsers must not be shared between threads)."""
    name = "utf8_parser" if forced_utf8 else "parser"
    parser: etree.XMLParser | None = _local.__dict__.get(name)
    if parser is None:
        parser = etree.XMLParser(
            encoding="utf-8" if forced_utf8 else None,
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            dtd_validation=False,
            attribute_defaults=False,
            huge_tree=False,
            collect_ids=False,
            # whitespace-only text between elements is never significant here
            remove_blank_text=True,
            strip_cdata=True,
        )
        setattr(_local, name, parser)
    return parser


def describe(el: etree._Element, attr: str | None = None) -> str:
    """``<disk name='vda'>`` (the element, identified by its name if it has one), plus
    `` attribute 'x'`` when an attribute is at fault."""
    tag = el.tag if isinstance(el.tag, str) else "?"
    name = el.get("name")
    where = (
        f"<{tag} name='{name}'>" if name is not None and tag != "domaincheckpoint" else f"<{tag}>"
    )
    return f"{where} attribute '{attr}'" if attr is not None else where


def line_of(node: etree._Element) -> int | None:
    line = node.sourceline
    return line if isinstance(line, int) else None


def fail(el: etree._Element, message: str, attr: str | None = None) -> NoReturn:
    raise XMLError(f"{describe(el, attr)}: {message}", line=line_of(el))


def one_of(values: Iterable[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def attr_choice(el: etree._Element, key: bytes, allowed: Mapping[str, _V]) -> _V | None:
    """Attribute ``key`` (bytes: lxml encodes a str key at every read) as one of
    ``allowed``, as ``choice`` reads it; None when absent."""
    value = el.get(key)
    if value is None:
        return None
    found = allowed.get(value)
    if found is None:
        return choice(el, key.decode(), value, allowed)  # raises
    return found


def choice(
    el: etree._Element, attr: str, value: str | None, allowed: Mapping[str, _V]
) -> _V | None:
    """``value`` (of attribute ``attr``; None when absent) as one of ``allowed``, exactly
    as written (the grammar's token values would also take it padded with spaces)."""
    if value is None:
        return None
    try:
        return allowed[value]
    except KeyError:
        fail(el, f"'{value[:80]}' is not one of {one_of(allowed)}", attr)


def once(seen: set[str], child: etree._Element) -> None:
    """Refuse a second ``child`` of the same tag (the fast grammars leave it to us)."""
    tag = child.tag
    assert isinstance(tag, str)
    if tag in seen:
        repeated(child)
    seen.add(tag)


def repeated(child: etree._Element) -> NoReturn:
    """Refuse ``child``: an earlier sibling has its tag (what ``once`` says)."""
    fail(child, f"<{child.tag}> may appear only once here")


def parse_document(
    doc: str | bytes, root: str, max_bytes: int | None = MAX_DOCUMENT_BYTES
) -> etree._Element:
    """Parse ``doc`` safely and check that its root element is ``<root>``.

    No DTD (a DOCTYPE is refused), no entity expansion, no network or file access,
    nothing over ``max_bytes`` (None: jobcore's own output, checked after formatting,
    which may outgrow the input it came from), nothing nested deeper than libxml2's limit.
    """
    limit = math.inf if max_bytes is None else max_bytes
    forced_utf8 = False
    data: bytes
    if type(doc) is bytes:
        data = doc
    elif isinstance(doc, str):
        forced_utf8 = True
        if len(doc) > limit:
            _too_large(root, len(doc))
        try:
            data = doc.encode("utf-8")
        except UnicodeError as exc:
            raise XMLError(f"<{root}> document is not valid text: {exc}", line=1) from None
    elif isinstance(doc, bytes | bytearray | memoryview):
        data = bytes(doc)
    else:
        raise XMLError(f"<{root}> document must be str or bytes, not {type(doc).__name__}", line=1)
    if len(data) > limit:
        _too_large(root, len(data))
    # Markup declarations are refused before libxml2 sees them. '!' is rare in XML, so a
    # one-byte scan (memchr) decides whether the slower substring scans are needed.
    if b"!" in data and (b"<!DOCTYPE" in data or b"<!ENTITY" in data):
        at = min(i for i in (data.find(b"<!DOCTYPE"), data.find(b"<!ENTITY")) if i >= 0)
        raise XMLError(
            f"<{root}> document: DOCTYPE and entity declarations are refused",
            line=data.count(b"\n", 0, at) + 1,
        )
    try:
        el = etree.fromstring(data, _parser(forced_utf8))
    except etree.XMLSyntaxError as exc:
        line, column = exc.position
        # lxml appends the position to libxml2's text; XMLError adds the line itself
        msg = (exc.msg or "malformed").strip().removesuffix(f", line {line}, column {column}")
        raise XMLError(
            f"<{root}> document is not well-formed XML: {msg}, at column {column}",
            line=line or None,
        ) from None
    except (ValueError, LookupError, UnicodeError) as exc:
        raise XMLError(f"<{root}> document cannot be parsed: {exc}", line=1) from None
    if el is None:
        raise XMLError(f"<{root}> document is empty", line=1)
    # A DOCTYPE the byte scan could not see: bytes in another encoding (UTF-16 starts with
    # a BOM or NUL, anything else declares its encoding). str input was scanned as UTF-8.
    if (
        not forced_utf8
        and (not data.startswith(b"<") or data.find(b"encoding", 0, 256) >= 0)
        and getattr(el.getroottree().docinfo, "doctype", None)
    ):
        raise XMLError(f"<{root}> document: DOCTYPE declarations are refused", line=1)
    if el.tag != root:
        tag = el.tag if isinstance(el.tag, str) else "?"
        raise XMLError(f"<{tag}>: expected a <{root}> document", line=line_of(el))
    return el


def _too_large(root: str, size: int) -> NoReturn:
    # line 1: the whole document, from its first line, is refused
    raise XMLError(
        f"<{root}> document of {size} bytes refused: the limit is {MAX_DOCUMENT_BYTES} bytes "
        "(1 MiB)",
        line=1,
    )


#: libxml2 messages that say the most, best first
_SPECIFIC = (
    "Invalid attribute",
    "doesn't allow value",
    "Error validating value",
    "Error validating datatype",
    "Did not expect",
    "Expecting",
    "Extra element",
    "has extra content",
    "Invalid sequence",
    "failed to validate attributes",
    "failed to validate content",
)


def _best(log: etree._ListErrorLog) -> etree._LogEntry | None:
    entries = list(log)
    for key in _SPECIFIC:
        for entry in entries:
            if key in entry.message:
                return entry
    return entries[0] if entries else None


_BAD_ATTR = re.compile(r"Invalid attribute (\S+) for element")


def _node(root: etree._Element, path: str) -> etree._Element | None:
    if not path:
        return None
    try:
        nodes = root.getroottree().xpath(path)
    except etree.XPathError:
        return None
    if isinstance(nodes, list) and nodes and isinstance(nodes[0], etree._Element):
        return nodes[0]
    return None


def validate(schema: Schema, el: etree._Element, what: str) -> None:
    """Validate ``el`` (a parsed document root) against ``schema``; an XMLError names the
    element at fault (its path and, for a bad value, the value) and its line."""
    if schema.rng.validate(el):
        return
    diagnostic = schema.diagnostic()
    diagnostic.validate(el)
    best = _best(diagnostic.error_log) or _best(schema.rng.error_log)
    if best is None:
        raise XMLError(f"invalid <{what}> document", line=line_of(el))
    message = best.message.strip()
    path = best.path or ""
    detail = ""
    node = _node(el, path)
    if node is not None:
        attr = _BAD_ATTR.match(message)
        value = node.get(attr.group(1)) if attr else None
        if value is None and ("datatype" in message or "value" in message):
            value = (node.text or "").strip() or None
        if value is not None and f"'{value}'" not in message:
            detail = f" (value '{value[:80]}')"
        allowed = (
            schema.allowed_values(str(node.tag), attr.group(1))
            if attr is not None and isinstance(node.tag, str)
            else ()
        )
        if allowed and value is not None:
            detail = f" (value '{value[:80]}'; allowed: {one_of(allowed)})"
    where = f" at {path}" if path else ""
    raise XMLError(
        f"invalid <{what}> document{where}: {message}{detail}", line=best.line or line_of(el)
    )


def check_depth(el: etree._Element, limit: int = MAX_DEPTH) -> None:
    """Refuse a subtree nested deeper than ``limit`` (used on content kept as written)."""
    stack: list[tuple[etree._Element, int]] = [(el, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            fail(node, f"nested deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in node)
