"""Canonical serialisation, in libvirt's style.

Elements one per line with 2-space indentation, attributes in single quotes in the order
they were set, empty elements self-closed, text escaped as libvirt escapes it (``< > & ' "``)
and a final newline. A subtree marked verbatim (a checkpoint's embedded ``<domain>``) keeps
its own whitespace, re-indented to where it is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from lxml import etree

from jobcore.errors import XMLError

XML_NS = "http://www.w3.org/XML/1998/namespace"

_TEXT = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;", '"': "&quot;", "\r": "&#13;"}
)
_ATTR = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        "'": "&apos;",
        '"': "&quot;",
        "\r": "&#13;",
        "\n": "&#10;",
        "\t": "&#9;",
    }
)
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _checked(value: str, where: str) -> str:
    bad = _NOT_XML.search(value)
    if bad is not None:
        raise XMLError(f"{where}: character U+{ord(bad.group()):04X} cannot be written in XML")
    return value


def esc_text(value: str, where: str = "text") -> str:
    return _checked(value, where).translate(_TEXT)


def esc_attr(value: str, where: str = "attribute") -> str:
    return _checked(value, where).translate(_ATTR)


def _qname(el: etree._Element, name: str) -> str:
    if not name.startswith("{"):
        return name
    uri, local = name[1:].split("}", 1)
    if uri == XML_NS:
        return f"xml:{local}"
    for prefix, ns in el.nsmap.items():
        if ns == uri:
            return f"{prefix}:{local}" if prefix else local
    raise XMLError(f"namespace '{uri}' of <{local}> has no prefix")


def _start(el: etree._Element, declare_all: bool) -> str:
    tag = el.tag
    assert isinstance(tag, str)
    parts = [f"<{_qname(el, tag)}"]
    parent = el.getparent()
    inherited = {} if declare_all or parent is None else parent.nsmap
    for prefix, uri in el.nsmap.items():
        if inherited.get(prefix) != uri:
            name = f"xmlns:{prefix}" if prefix else "xmlns"
            parts.append(f" {name}='{esc_attr(uri)}'")
    for key, value in el.attrib.items():
        name = _qname(el, str(key))
        parts.append(f" {name}='{esc_attr(str(value), f'<{tag}> attribute {name!r}')}'")
    return "".join(parts)


def _blank(text: str | None) -> bool:
    return text is None or text.strip() == ""


def _raw(el: etree._Element, ws: Callable[[str], str], out: list[str], top: bool) -> None:
    """Write ``el`` as it is, passing its whitespace-only text through ``ws``."""
    if isinstance(el, etree._Comment):
        out.append(f"<!--{el.text or ''}-->")
        return
    if isinstance(el, etree._ProcessingInstruction):
        target = str(el.target)
        out.append(f"<?{target} {el.text}?>" if el.text else f"<?{target}?>")
        return
    if isinstance(el, etree._Entity):
        raise XMLError(f"entity reference &{el.name}; refused")
    out.append(_start(el, top))
    if len(el) == 0 and not el.text:
        out.append("/>")
        return
    out.append(">")
    _text(el.text, ws, out)
    for child in el:
        _raw(child, ws, out, False)
        _text(child.tail, ws, out)
    tag = el.tag
    assert isinstance(tag, str)
    out.append(f"</{_qname(el, tag)}>")


def _text(text: str | None, ws: Callable[[str], str], out: list[str]) -> None:
    if text:
        out.append(ws(text) if _blank(text) else esc_text(text))


def verbatim(el: etree._Element, ws: Callable[[str], str] = lambda t: t) -> str:
    """``el`` as standalone XML text, its own whitespace kept (through ``ws``)."""
    out: list[str] = []
    _raw(el, ws, out, True)
    return "".join(out)


#: (parent tag, child tag) pairs written verbatim rather than re-indented
VERBATIM_CHILDREN = frozenset({("domaincheckpoint", "domain")})


def _pretty(el: etree._Element, level: int, out: list[str]) -> None:
    indent = "  " * level
    if not isinstance(el.tag, str):  # comment or PI in a tree a codec built
        out.append(indent)
        _raw(el, lambda t: t, out, False)
        out.append("\n")
        return
    children = list(el)
    if not children:
        out.append(indent + _start(el, level == 0))
        if el.text:
            out.append(f">{esc_text(el.text, f'<{el.tag}>')}</{_qname(el, el.tag)}>\n")
        else:
            out.append("/>\n")
        return
    out.append(indent + _start(el, level == 0) + ">")
    if not _blank(el.text):
        out.append(esc_text(el.text or "", f"<{el.tag}>"))
    out.append("\n")
    inner = "  " * (level + 1)
    for child in children:
        if (el.tag, child.tag) in VERBATIM_CHILDREN:
            out.append(inner + verbatim(child, lambda t: t.replace("\n", "\n" + inner)) + "\n")
        else:
            _pretty(child, level + 1, out)
    out.append(f"{indent}</{_qname(el, el.tag)}>\n")


def serialize(el: etree._Element) -> str:
    """The canonical text of a document whose root is ``el``, with a final newline."""
    out: list[str] = []
    _pretty(el, 0, out)
    return "".join(out)
