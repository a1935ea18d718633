"""Connection URIs, libvirt style: ``DRIVER[+TRANSPORT]://[HOST]/PATH[?k=v&…]``."""

from __future__ import annotations

import urllib.parse

from attrs import frozen

from jobcore.errors import InvalidURI

MAX_URI_LENGTH = 4096


@frozen
class URI:
    driver: str  # e.g. 'sim', 'qemu'
    transport: str | None  # e.g. 'unix' in 'sim+unix:///default'
    host: str
    path: str  # e.g. '/default', '/session'
    params: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        """The path without its leading slash: 'default' for 'sim:///default'."""
        return self.path.lstrip("/")

    def param(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.params:
            if k == key:
                return v
        return default

    def without_transport(self) -> str:
        """The URI a daemon opens for a remote client: transport and socket dropped."""
        query = urllib.parse.urlencode([(k, v) for k, v in self.params if k != "socket"])
        return f"{self.driver}://{self.host}{self.path}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        scheme = self.driver + (f"+{self.transport}" if self.transport else "")
        query = urllib.parse.urlencode(self.params)
        return f"{scheme}://{self.host}{self.path}" + (f"?{query}" if query else "")


def parse_uri(text: str) -> URI:
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
    return URI(driver, transport or None, parts.netloc, path, tuple(params))


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
