"""A connection URI's parts, checked, without the ``URI`` value class (jobcore.uri builds
it from these): what ``jobctl``'s fast start (jobcore.cli.fast) reads, loading no attrs."""

from __future__ import annotations

import urllib.parse

from jobcore.errors import InvalidURI

MAX_URI_LENGTH = 4096

#: driver, transport (None when there is none), host, path, params
Parts = tuple[str, str | None, str, str, tuple[tuple[str, str], ...]]


def split_uri(text: str) -> Parts:
    """``DRIVER[+TRANSPORT]://[HOST]/PATH[?k=v&…]`` in its parts; InvalidURI if it is not
    one (jobcore.uri.parse_uri's rules: they are these)."""
    if not isinstance(text, str) or not text or len(text) > MAX_URI_LENGTH:
        raise InvalidURI(f"invalid connection URI {text!r}")
    parts = urllib.parse.urlsplit(text)
    if not parts.scheme or "://" not in text:
        raise InvalidURI(f"invalid connection URI '{text}': expected DRIVER:///PATH")
    driver, _, transport = parts.scheme.partition("+")
    if not driver.isidentifier():
        raise InvalidURI(f"invalid driver name in URI '{text}'")
    try:
        params = urllib.parse.parse_qsl(
            parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)
        )
    except ValueError:
        raise InvalidURI(f"invalid query in URI '{text}'") from None
    path = parts.path or "/"
    odd = _odd_path(path)
    if odd is not None:
        raise InvalidURI(
            f"invalid path '{path[:200]}' in URI '{text[:200]}': {odd}; write it as "
            "DRIVER:///NAME (one leading slash, no empty, '.' or '..' segments, no trailing "
            "slash, no percent-encoding)"
        )
    return driver, transport or None, parts.netloc, path, tuple(params)


def driver_uri(driver: str, host: str, path: str, params: tuple[tuple[str, str], ...]) -> str:
    """The URI a daemon opens for a remote client: no transport, no ``socket``."""
    query = urllib.parse.urlencode([(k, v) for k, v in params if k != "socket"])
    return f"{driver}://{host}{path}" + (f"?{query}" if query else "")


def _odd_path(path: str) -> str | None:
    """Why ``path`` is not in its one canonical spelling (None if it is): two spellings of
    one name would otherwise open two connections (two simulated hosts) with one name."""
    if path == "/":
        return None
    if not path.startswith("/"):
        return "it must start with '/'"
    if "%" in path:
        return "percent-encoding is refused"
    if path.endswith("/"):
        return "a trailing '/' is refused"
    segments = path[1:].split("/")
    if "" in segments:
        return "an empty segment ('//') is refused"
    if "." in segments or ".." in segments:
        return "'.' and '..' segments are refused"
    return None
