"""Canonical serialisation, in libvirt's style.

Elements one per line with 2-space indentation, attributes in single quotes in the order
they were set, empty elements self-closed, text escaped as libvirt escapes it (``< > & ' "``)
and a final newline. An element with text between its children (mixed content) is written
as it is, without added whitespace.
"""

from __future__ import annotations

import re

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
    nsmap = el.nsmap
    if nsmap:  # (no namespace in scope: nothing to declare, the parent's map unread)
        parent = el.getparent()
        inherited = {} if declare_all or parent is None else parent.nsmap
        for prefix, uri in nsmap.items():
            if inherited.get(prefix) != uri:
                name = f"xmlns:{prefix}" if prefix else "xmlns"
                parts.append(f" {name}='{esc_attr(uri)}'")
    for key, value in el.items():
        name = _qname(el, str(key))
        value = str(value)
        if _NOT_XML.search(value) is not None:  # the error names where
            esc_attr(value, f"<{tag}> attribute {name!r}")
        parts.append(f" {name}='{value.translate(_ATTR)}'")
    return "".join(parts)


def _blank(text: str | None) -> bool:
    return text is None or text.strip() == ""


def _raw(el: etree._Element, out: list[str], top: bool) -> None:
    """Write ``el`` as it is: its text and tails untouched but escaped."""
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
    if el.text:
        out.append(esc_text(el.text))
    for child in el:
        _raw(child, out, False)
        if child.tail:
            out.append(esc_text(child.tail))
    tag = el.tag
    assert isinstance(tag, str)
    out.append(f"</{_qname(el, tag)}>")


def _pretty(el: etree._Element, level: int, out: list[str]) -> None:
    indent = "  " * level
    tag = el.tag
    if not isinstance(tag, str):  # comment or PI
        out.append(indent)
        _raw(el, out, False)
        out.append("\n")
        return
    children = list(el)  # (each child's proxy made once)
    if not children:
        out.append(indent + _start(el, level == 0))
        text = el.text
        if text:
            if _NOT_XML.search(text) is not None:  # the error names where
                esc_text(text, f"<{tag}>")
            out.append(f">{text.translate(_TEXT)}</{_qname(el, tag)}>\n")
        else:
            out.append("/>\n")
        return
    if not _blank(el.text) or any(not _blank(child.tail) for child in children):
        # text between child elements is content (mixed): written as it is
        out.append(indent)
        _raw(el, out, level == 0)
        out.append("\n")
        return
    out.append(indent + _start(el, level == 0) + ">\n")
    for child in children:
        _pretty(child, level + 1, out)
    out.append(f"{indent}</{_qname(el, tag)}>\n")


def serialize(el: etree._Element) -> str:
    """The canonical text of a document whose root is ``el``, with a final newline."""
    out: list[str] = []
    _pretty(el, 0, out)
    return "".join(out)
