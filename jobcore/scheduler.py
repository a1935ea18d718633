"""Admission of jobs: resource claims, the conflict matrix, and FIFO queues.

Each prepared spec yields claims (``Claim(resource, mode)``) on a domain, its disks, the
images of their chains and backup target files: its type says which
(``JobTypeInfo.claims``, in jobcore.types). Two claims on the same resource conflict when
the matrix says their modes do. Admission looks
only at the claimed resources' holders and waiters, so its cost does not grow with the
number of jobs.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import os
import uuid
from collections.abc import Iterable

from attrs import define, field, frozen

from jobcore.errors import JobConflict


class Mode(enum.StrEnum):
    #: the whole domain, alone (migration)
    DOMAIN_EXCLUSIVE = "domain-exclusive"
    #: the domain, alongside other shared holders (every other job)
    DOMAIN_SHARED = "domain-shared"
    #: a disk's backing chain is rewritten (block pull, block commit)
    CHAIN = "chain"
    #: a disk is read as of a point in time (backup)
    READ = "read"
    #: a file is written (backup target or scratch)
    WRITE = "write"


#: mode -> the modes it conflicts with on the same resource. Symmetric; checked below.
CONFLICTS: dict[Mode, frozenset[Mode]] = {
    Mode.DOMAIN_EXCLUSIVE: frozenset({Mode.DOMAIN_EXCLUSIVE, Mode.DOMAIN_SHARED}),
    Mode.DOMAIN_SHARED: frozenset({Mode.DOMAIN_EXCLUSIVE}),
    Mode.CHAIN: frozenset({Mode.CHAIN, Mode.READ}),
    Mode.READ: frozenset({Mode.CHAIN}),
    Mode.WRITE: frozenset({Mode.WRITE}),
}
assert all(a in CONFLICTS[b] for a in Mode for b in CONFLICTS[a]), "matrix must be symmetric"


@frozen
class Claim:
    resource: str  # 'domain:vm1', 'disk:vm1/vda', 'file:/path', 'image:/path'
    mode: Mode


def domain_resource(domain: str) -> str:
    return f"domain:{domain}"


def disk_resource(domain: str, disk: str) -> str:
    return f"disk:{domain}/{disk}"


def checkpoint_resource(domain: str, checkpoint: str) -> str:
    """What an incremental backup reads from (its base checkpoint): a checkpoint delete
    is refused while it has holders."""
    return f"checkpoint:{domain}/{checkpoint}"


def normalize_path(path: str) -> str:
    """One spelling per file: the directory resolved (``//``, ``.``, ``..`` and symbolic
    links, as the kernel would), the last component kept as written (a symbolic link there
    is the caller's business: drivers refuse an existing name). A few ``lstat`` calls."""
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    head, tail = os.path.split(path)
    if tail in ("", ".", ".."):
        return os.path.realpath(path)
    return os.path.join(os.path.realpath(head), tail)


def file_resource(path: str) -> str:
    """The resource of a file a job writes or creates (target, scratch, NBD socket), from
    its path in normalize_path's spelling (a prepared spec's: normalised once, at prepare)."""
    return f"file:{path}"


def image_resource(path: str) -> str:
    """The resource of a disk image (a layer of a backing chain) a job reads or rewrites:
    two domains on one image (a shared base, or a copy on shared storage) contend for it.
    The path in normalize_path's spelling."""
    return f"image:{normalize_path(path)}"


@frozen
class Conflict:
    holder: uuid.UUID
    mode: Mode  # the holder's (or earlier waiter's) mode
    claim: Claim  # the claim it blocks
    waiting: bool  # the blocker is queued, not holding


@define(eq=False)
class Ticket:
    """A job's claims, as held or waited on in the scheduler."""

    job: uuid.UUID
    claims: tuple[Claim, ...]
    priority: int = 0
    seq: int = 0
    waiting: bool = False
    #: the tickets admitted only together with this one (an all-or-nothing job group's,
    #: queued: design/scheduling.md "Job groups"); None for a job on its own
    together: tuple[Ticket, ...] | None = None

    @property
    def order(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


@define(eq=False)
class _Resource:
    holders: dict[Mode, dict[uuid.UUID, None]] = field(factory=dict)
    #: (order, seq-unique ticket, mode), kept sorted: the FIFO queue of this resource
    waiters: list[tuple[tuple[int, int], Ticket, Mode]] = field(factory=list)

    def conflicting_holder(self, mode: Mode) -> tuple[uuid.UUID, Mode] | None:
        for other in CONFLICTS[mode]:
            held = self.holders.get(other)
            if held:
                return next(iter(held)), other
        return None

    def earlier_conflicting_waiter(
        self, mode: Mode, ticket: Ticket
    ) -> tuple[uuid.UUID, Mode] | None:
        for order, waiter, wmode in self.waiters:
            if order >= ticket.order:
                break
            if wmode in CONFLICTS[mode]:
                return waiter.job, wmode
        return None

    def remove_waiter(self, ticket: Ticket) -> None:
        self.waiters = [w for w in self.waiters if w[1] is not ticket]

    def empty(self) -> bool:
        return not self.waiters and not any(self.holders.values())


class Scheduler:
    """Holds the claims of admitted jobs and the queues of waiting ones."""

    def __init__(self) -> None:
        self._resources: dict[str, _Resource] = {}
        self._seq = itertools.count()

    def _res(self, name: str) -> _Resource:
        res = self._resources.get(name)
        if res is None:
            res = self._resources[name] = _Resource()
        return res

    def ticket(self, job: uuid.UUID, claims: tuple[Claim, ...], priority: int = 0) -> Ticket:
        return Ticket(job, claims, priority, next(self._seq))

    def conflict(self, ticket: Ticket) -> Conflict | None:
        """The first holder, or earlier waiter, that keeps ``ticket`` out, if any."""
        for claim in ticket.claims:
            res = self._resources.get(claim.resource)
            if res is None:
                continue
            found = res.conflicting_holder(claim.mode)
            waiting = found is None
            if found is None:
                found = res.earlier_conflicting_waiter(claim.mode, ticket)
            if found is not None and found[0] != ticket.job:
                return Conflict(found[0], found[1], claim, waiting)
        return None

    def try_admit(self, ticket: Ticket) -> None:
        """Admit now or raise JobConflict naming the holder and the resource."""
        found = self.conflict(ticket)
        if found is not None:
            role = "queued before it for" if found.waiting else "holding"
            raise JobConflict(
                f"job '{ticket.job}' conflicts with job '{found.holder}' {role} "
                f"'{found.claim.resource}' ({found.mode.value} excludes "
                f"{found.claim.mode.value})",
                holder=found.holder,
                resource=found.claim.resource,
            )
        self._hold(ticket)

    def admit_or_enqueue(self, ticket: Ticket) -> bool:
        """Admit now (True) or put the ticket in the FIFO queues (False)."""
        if self.conflict(ticket) is None:
            self._hold(ticket)
            return True
        ticket.waiting = True
        for claim in ticket.claims:
            bisect.insort(
                self._res(claim.resource).waiters,
                (ticket.order, ticket, claim.mode),
                key=lambda w: w[0],
            )
        return False

    def _hold(self, ticket: Ticket) -> None:
        for claim in ticket.claims:
            self._res(claim.resource).holders.setdefault(claim.mode, {})[ticket.job] = None

    def release(self, ticket: Ticket) -> list[Ticket]:
        """Drop a ticket (held or waiting); return waiting tickets admitted as a result."""
        touched: list[_Resource] = []
        for claim in ticket.claims:
            res = self._resources.get(claim.resource)
            if res is None:
                continue
            if ticket.waiting:
                res.remove_waiter(ticket)
            else:
                held = res.holders.get(claim.mode)
                if held is not None:
                    held.pop(ticket.job, None)
            touched.append(res)
        ticket.waiting = False
        admitted = self._wake(touched) if any(res.waiters for res in touched) else []
        for claim in ticket.claims:
            res = self._resources.get(claim.resource)
            if res is not None and res.empty():
                del self._resources[claim.resource]
        return admitted

    def _wake(self, touched: Iterable[_Resource]) -> list[Ticket]:
        candidates = sorted(
            {id(t): t for res in touched for _, t, _ in res.waiters}.values(), key=lambda t: t.order
        )
        admitted: list[Ticket] = []
        for ticket in candidates:
            if ticket.together is not None:  # a queued group: all its tickets or none
                if ticket.waiting:
                    admitted.extend(self._wake_together(ticket.together))
                continue
            if self.conflict(ticket) is None:
                self._dequeue(ticket)
                self._hold(ticket)
                admitted.append(ticket)
        return admitted

    # ---- job groups (design/scheduling.md "Job groups") --------------------------------

    def _first_conflict(self, tickets: Iterable[Ticket]) -> tuple[Ticket, Conflict] | None:
        for ticket in tickets:
            found = self.conflict(ticket)
            if found is not None:
                return ticket, found
        return None

    def admit_all(self, tickets: Iterable[Ticket]) -> None:
        """Admit every ticket now, or none: JobConflict naming the first member that
        cannot be admitted and its blocker (the tickets must not conflict among
        themselves: the engine checks that first)."""
        tickets = list(tickets)
        found = self._first_conflict(tickets)
        if found is not None:
            ticket, c = found
            role = "queued before it for" if c.waiting else "holding"
            raise JobConflict(
                f"group member job '{ticket.job}' conflicts with job '{c.holder}' {role} "
                f"'{c.claim.resource}' ({c.mode.value} excludes {c.claim.mode.value}): "
                "no member was begun",
                holder=c.holder,
                resource=c.claim.resource,
            )
        for ticket in tickets:
            self._hold(ticket)

    def admit_or_enqueue_all(self, tickets: Iterable[Ticket]) -> bool:
        """Admit every ticket now (True) or queue every one (False); queued, they are
        admitted all at once, when none of them conflicts (an all-or-nothing group)."""
        tickets = list(tickets)
        if self._first_conflict(tickets) is None:
            for ticket in tickets:
                self._hold(ticket)
            return True
        group = tuple(tickets)
        for ticket in tickets:
            ticket.together = group
            ticket.waiting = True
            for claim in ticket.claims:
                bisect.insort(
                    self._res(claim.resource).waiters,
                    (ticket.order, ticket, claim.mode),
                    key=lambda w: w[0],
                )
        return False

    def _wake_together(self, tickets: tuple[Ticket, ...]) -> list[Ticket]:
        """Admit a queued group's tickets if every one is still queued and none
        conflicts; else none of them."""
        if not all(t.waiting for t in tickets) or self._first_conflict(tickets) is not None:
            return []
        for ticket in tickets:  # ``together`` stays: the siblings later in _wake are skipped
            self._dequeue(ticket)
            self._hold(ticket)
        return list(tickets)

    def _dequeue(self, ticket: Ticket) -> None:
        for claim in ticket.claims:
            self._resources[claim.resource].remove_waiter(ticket)
        ticket.waiting = False

    def holders(self, resource: str) -> dict[Mode, list[uuid.UUID]]:
        res = self._resources.get(resource)
        return {} if res is None else {m: list(h) for m, h in res.holders.items() if h}

    def resource_count(self) -> int:
        return len(self._resources)
