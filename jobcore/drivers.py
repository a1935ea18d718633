"""Finding the driver for a URI: built-in drivers, then the ``jobcore.drivers`` entry
points (third-party drivers register there by URI scheme)."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from jobcore.driver import Driver
from jobcore.errors import InvalidArgument, InvalidURI
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


def check_uri_params(driver: Driver, uri: URI) -> None:
    """Refuse query parameters the driver does not read (it declares ``uri_params``) and
    parameters given twice, with InvalidArgument naming them. A driver that declares
    nothing is not checked."""
    known: frozenset[str] | None = getattr(driver, "uri_params", None)
    given = [k for k, _ in uri.params]
    if known is not None:
        unknown = sorted({k for k in given if k not in known})
        if unknown:
            hint = (
                " ('socket' names a jobd socket: use a DRIVER+unix:// URI)"
                if "socket" in unknown
                else ""
            )
            raise InvalidArgument(
                f"unknown URI parameter{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(k) for k in unknown)} in '{uri}': the {uri.driver} driver "
                f"reads {', '.join(sorted(known)) or 'no parameters'}{hint}"
            )
    twice = sorted({k for k in given if given.count(k) > 1})
    if twice:
        raise InvalidArgument(
            f"URI parameter {', '.join(repr(k) for k in twice)} given more than once in '{uri}'"
        )
