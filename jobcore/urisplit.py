"""A connection URI's parts, checked, without the ``URI`` value class (jobcore.uri builds
it from these): what ``jobctl``'s fast start (jobcore.cli.fast) reads, loading no attrs.

A URI of plain characters only (``sim+unix:///default?socket=/run/jobd.sock&rate=1024``) is
split without urllib.parse (which imports re: a few ms of a start) into what urllib's
split gives it (tests/test_jobctl_fast.py compares the two); any other goes to urllib."""

from __future__ import annotations

from jobcore.errors import InvalidURI

MAX_URI_LENGTH = 4096

#: driver, transport (None when there is none), host, path, params
Parts = tuple[str, str | None, str, str, tuple[tuple[str, str], ...]]

#: characters urllib's quoting leaves as they are (and its unquoting too)
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-~")
_PLAIN_PATH = _PLAIN | {"/"}
_SCHEME = frozenset("abcdefghijklmnopqrstuvwxyz0123456789+")


def split_uri(text: str) -> Parts:
    """``DRIVER[+TRANSPORT]://[HOST]/PATH[?k=v&…]`` in its parts; InvalidURI if it is not
    one (jobcore.uri.parse_uri's rules: they are these)."""
    if isinstance(text, str) and text and len(text) <= MAX_URI_LENGTH:
        plain = _split_plain(text)
        if plain is not None:
            return plain
    return _split(text)


def _split(text: str) -> Parts:
    import urllib.parse

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


def _split_plain(text: str) -> Parts | None:
    """``_split(text)`` for a valid URI of plain characters: a lower-case scheme of letters
    and digits with at most one ``+``, a host of plain characters, a path in its one
    canonical spelling, ``k=v`` pairs of plain characters and ``/``; None for any other."""
    scheme, sep, rest = text.partition("://")
    driver, plus, transport = scheme.partition("+")
    if not sep or not set(scheme) <= _SCHEME or "+" in transport or (plus and not transport):
        return None
    if not driver.isidentifier() or not driver[0].isalpha():
        return None
    rest, qmark, query = rest.partition("?")
    host, slash, path = rest.partition("/")
    if not set(host) <= _PLAIN or not set(path) <= _PLAIN_PATH:
        return None
    path = slash + path or "/"
    if _odd_path(path) is not None or (qmark and not query):
        return None
    params = []
    if query:
        for pair in query.split("&"):
            key, eq, value = pair.partition("=")
            if not key or not eq or not set(key) <= _PLAIN_PATH or not set(value) <= _PLAIN_PATH:
                return None
            params.append((key, value))
    return driver, transport or None, host, path, tuple(params)


def driver_uri(driver: str, host: str, path: str, params: tuple[tuple[str, str], ...]) -> str:
    """The URI a daemon opens for a remote client: no transport, no ``socket``."""
    kept = [(k, v) for k, v in params if k != "socket"]
    if all(set(k) <= _PLAIN and set(v) <= _PLAIN for k, v in kept):
        query = "&".join(f"{k}={v}" for k, v in kept)  # urlencode's: it quotes none of these
    else:
        import urllib.parse

        query = urllib.parse.urlencode(kept)
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
