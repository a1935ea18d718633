"""Handle bases the in-process (jobcore.local) and remote (jobcore.remote) implementations
share: identity, equality and the names that need no round trip."""

from __future__ import annotations

from typing import Protocol


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class CheckpointHandle:
    """What the in-process and remote checkpoint handles share: a domain handle and a
    name, equal when both name the same checkpoint of the same domain."""

    def __init__(self, dom: _Named, name: str) -> None:
        self._dom = dom
        self._name = name

    def __repr__(self) -> str:
        return f"<Checkpoint {self._name!r} of {self._dom.name!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, type(self)) and (other.domain, other.name) == (
            self.domain,
            self.name,
        )

    def __hash__(self) -> int:
        return hash((self.domain, self._name))

    @property
    def name(self) -> str:
        return self._name

    @property
    def domain(self) -> str:
        return self._dom.name
