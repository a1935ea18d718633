"""Finding the driver for a URI: built-in drivers, then the ``jobcore.drivers`` entry
points (third-party drivers register there by URI scheme)."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from jobcore.driver import Driver
from jobcore.errors import InvalidURI
from jobcore.uri import URI

BUILTIN = {
    "sim": "drivers.sim:SimDriver",
    "qemu": "drivers.qemu:QemuDriver",
}


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_driver(uri: URI) -> Driver:
    if uri.transport is not None:
        if uri.transport != "unix":
            raise InvalidURI(f"unsupported transport '{uri.transport}' in '{uri}'")
        raise InvalidURI(
            f"'{uri}' names a jobd socket, not a driver: open it with jobcore.connect()"
        )
    for ep in entry_points(group="jobcore.drivers"):
        if ep.name == uri.driver:
            loaded: Driver = ep.load()()
            return loaded
    target = BUILTIN.get(uri.driver)
    if target is None:
        raise InvalidURI(f"no driver registered for URI scheme '{uri.driver}'")
    builtin: Driver = _load(target)()
    return builtin
