"""Connection URIs, libvirt style: ``DRIVER[+TRANSPORT]://[HOST]/PATH[?k=v&…]``."""

from __future__ import annotations

import urllib.parse

from attrs import frozen

from jobcore.urisplit import MAX_URI_LENGTH as MAX_URI_LENGTH  # re-exported
from jobcore.urisplit import driver_uri, split_uri


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
        return driver_uri(self.driver, self.host, self.path, self.params)

    def __str__(self) -> str:
        scheme = self.driver + (f"+{self.transport}" if self.transport else "")
        query = urllib.parse.urlencode(self.params)
        return f"{scheme}://{self.host}{self.path}" + (f"?{query}" if query else "")


def parse_uri(text: str) -> URI:
    return URI(*split_uri(text))
