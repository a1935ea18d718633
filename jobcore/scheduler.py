"""Admission of jobs: resource claims, the conflict matrix, and FIFO queues.

Each prepared spec yields claims (``Claim(resource, mode)``) on a domain, its disks, the
images of their chains and backup target files: its type says which
(``JobTypeInfo.claims``, in jobcore.types). Two claims on the same resource conflict when
the matrix says their modes do. Admission looks
only at the claimed resources' holders and waiters, so its cost does not grow with the
number of jobs.

What a job does about a conflict is a policy (``Policy``: reject, queue, preempt), looked
up per pair in conflict in a table that is data (``PolicyTable``, keyed by the holder's
job type and the incoming job's; design/scheduling.md "Policy"). ``verdict`` is the one
admission decision: begin applies it, explain reports it. Queued jobs age: each time a
later job is admitted ahead of a waiter it blocks, the waiter's queue priority rises by
``AGING_BOOST``, so a steady stream of higher-priority jobs cannot starve it.
"""

from __future__ import annotations

import bisect
import enum
import errno
import itertools
import os
import stat
import uuid
from collections.abc import Iterable, Mapping, Sequence

from attrs import define, frozen

from jobcore.errors import InvalidArgument, JobConflict
from jobcore.spec import Decision as Decision  # defined below the scheduler, named here too
from jobcore.spec import Policy

__all__ = [
    "AGING_BOOST",
    "ANY",
    "CONFLICTS",
    "DEFAULT_POLICY",
    "KUBEVIRT_POLICY",
    "POLICY_TABLES",
    "Claim",
    "Conflict",
    "Decision",
    "GroupVerdict",
    "Mode",
    "Policy",
    "PolicyTable",
    "Scheduler",
    "Ticket",
    "Verdict",
    "policy_table",
    "table_name",
]


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
    if not path.startswith("/"):  # (os.path.isabs, without its calls)
        path = os.path.join(os.getcwd(), path)
    cut = path.rfind("/")
    plain = 0 < cut and path[cut - 1] != "/" and path[cut + 1 :] not in ("", ".", "..")
    if plain and _plain_dir(path[:cut]):
        return path  # what realpath(head) + tail gives: head is its own resolution
    head, tail = os.path.split(path)
    if tail in ("", ".", ".."):
        return os.path.realpath(path)
    return os.path.join(os.path.realpath(head), tail)


#: lstat errors of a path that every path below it gets too
_FAILS_BELOW = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EACCES})


def _plain_dir(head: str) -> bool:
    """Whether ``os.path.realpath(head)`` is ``head`` itself, found with realpath's lstat
    calls (one per component, from the root): ``head`` is absolute, spelt without ``//``,
    ``.`` or ``..``, and no component is a symbolic link. A component that cannot be
    lstat'ed is kept as written, as realpath keeps it; one that does not exist, or whose
    directory cannot be searched, ends the walk (every one below fails the same way: the
    lookup of each passes through it). False: let realpath say."""
    if not head.startswith("/") or "//" in head or "/." in head:
        return False  # (a component starting with '.' goes the long way: rare)
    end = head.find("/", 1)
    while True:
        try:
            if stat.S_ISLNK(os.lstat(head if end < 0 else head[:end]).st_mode):
                return False
        except OSError as exc:
            if exc.errno in _FAILS_BELOW:
                return True
        if end < 0:
            return True
        end = head.find("/", end + 1)


def file_resource(path: str) -> str:
    """The resource of a file a job writes or creates (target, scratch, NBD socket), from
    its path in normalize_path's spelling (a prepared spec's: normalised once, at prepare)."""
    return f"file:{path}"


def image_resource(path: str) -> str:
    """The resource of a disk image (a layer of a backing chain) a job reads or rewrites:
    two domains on one image (a shared base, or a copy on shared storage) contend for it.
    The path in normalize_path's spelling."""
    return f"image:{normalize_path(path)}"


#: a wildcard job type in a policy table key
ANY = "*"

#: (holder's job type, incoming job's type) -> the policy for that pair in conflict; ANY
#: matches every type. Looked up most specific first: (holder, incoming), (holder, ANY),
#: (ANY, incoming), (ANY, ANY). No rule: the incoming job's choice (queue if it asked,
#: else reject). The modes are not in the key: a type's claims fix them.
PolicyTable = Mapping[tuple[str, str], Policy]

#: the default table: no rule, so today's behaviour (fail fast unless the job asks to queue)
DEFAULT_POLICY: PolicyTable = {}

#: KubeVirt's rule as data: a migration preempts a backup of its domain (given a higher
#: priority: preemption always needs one); a backup never waits for a migration.
KUBEVIRT_POLICY: PolicyTable = {
    ("backup", "migration"): Policy.PREEMPT,
}

#: the tables by name (jobd's ``--policy NAME``, ``jobcore.connect(policy=NAME)``); a
#: rule of a named table says its name in explain's rule text
POLICY_TABLES: Mapping[str, PolicyTable] = {"default": DEFAULT_POLICY, "kubevirt": KUBEVIRT_POLICY}


def policy_table(policy: str | PolicyTable) -> PolicyTable:
    """A policy table given by name (``POLICY_TABLES``) or as one (its keys pairs of job
    type names or ``ANY``, its values ``Policy``); InvalidArgument naming what is wrong."""
    if isinstance(policy, str):
        table = POLICY_TABLES.get(policy)
        if table is None:
            raise InvalidArgument(
                f"unknown policy table '{policy}': one of {', '.join(sorted(POLICY_TABLES))}"
            )
        return table
    if not isinstance(policy, Mapping):
        raise InvalidArgument(f"a policy table is a name or a mapping, not {policy!r}")
    for key, value in policy.items():
        if not (
            isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) and k for k in key)
        ):
            raise InvalidArgument(f"policy table key {key!r} is not (holder type, incoming type)")
        if not isinstance(value, Policy):
            raise InvalidArgument(f"policy table rule {key!r}: {value!r} is not a Policy")
    return policy


def table_name(table: PolicyTable) -> str | None:
    """The name ``table`` has in ``POLICY_TABLES`` (by identity), if any."""
    return next((name for name, t in POLICY_TABLES.items() if t is table), None)


#: queue levels a waiter gains each time a later job is admitted ahead of it on a
#: resource where it blocks that waiter (aging, design/scheduling.md "Fairness")
AGING_BOOST = 1


@frozen
class Conflict:
    holder: uuid.UUID
    mode: Mode  # the holder's (or earlier waiter's) mode
    claim: Claim  # the claim it blocks
    waiting: bool  # the blocker is queued, not holding
    #: the rule that decides: the modes in conflict, the policy and where it comes from
    rule: str = ""
    #: the policy that applies to this blocker (after the priority check of a preempt)
    policy: Policy = Policy.REJECT


@frozen
class Verdict:
    """The admission decision for one ticket in the scheduler's current state."""

    decision: Decision
    #: every job in the way, one entry per job (its first contested claim), in claim order
    blockers: tuple[Conflict, ...] = ()

    @property
    def victims(self) -> tuple[uuid.UUID, ...]:
        """The holders a PREEMPT takes the resources from."""
        return tuple(c.holder for c in self.blockers) if self.decision is Decision.PREEMPT else ()


#: the verdict of every ticket nothing blocks (a frozen value: one is enough)
_ADMIT = Verdict(Decision.ADMIT)


@frozen
class GroupVerdict:
    """The admission decision for a job group's tickets (``Scheduler.verdict_all``)."""

    #: the group's: conflict, queue, preempt or admit (design/scheduling.md "Job groups")
    decision: Decision
    #: each member's own verdict, in document order
    members: tuple[Verdict, ...]

    def refusal(self, tickets: Sequence[Ticket]) -> tuple[Ticket, Conflict]:
        """The first member refused (CONFLICT) and its first blocker whose policy rejects."""
        for ticket, member in zip(tickets, self.members, strict=True):
            if member.decision is Decision.CONFLICT:
                return ticket, next(c for c in member.blockers if c.policy is Policy.REJECT)
        raise ValueError("no member of the group is refused")

    def victims(self, index: int, *, together: bool) -> tuple[uuid.UUID, ...]:
        """The holders member ``index`` takes its resources from: ``together`` (an
        all-or-nothing group) only when the group's decision is PREEMPT (a group that
        queues preempts nobody), else as the member's own verdict says."""
        if together and self.decision is not Decision.PREEMPT:
            return ()
        return self.members[index].victims


@define(eq=False)
class Ticket:
    """A job's claims, as held or waited on in the scheduler."""

    job: uuid.UUID
    claims: tuple[Claim, ...]
    priority: int = 0
    seq: int = 0
    waiting: bool = False
    #: the job's type (the policy table's key); "" for a bare ticket
    type: str = ""
    #: the job's own ``<policy conflict='…'/>``, or None
    policy: Policy | None = None
    #: it asked to queue (``<queue/>`` or the QUEUE flag)
    queue: bool = False
    #: queue levels gained by aging (AGING_BOOST per overtake)
    boost: int = 0
    #: a preemptor took its resources (paused and waiting, or being cancelled)
    preempted: bool = False
    #: the tickets admitted only together with this one (an all-or-nothing job group's,
    #: queued: design/scheduling.md "Job groups"); None for a job on its own
    together: tuple[Ticket, ...] | None = None
    #: it preempts: until its victims let go it waits ahead of every waiter (admitting
    #: others meanwhile ages none past it), as the verdict that let it preempt promised
    leading: bool = False

    @property
    def order(self) -> tuple[int, int, int]:
        return (0 if self.leading else 1, -(self.priority + self.boost), self.seq)


class _Resource:
    __slots__ = ("holders", "waiters")

    def __init__(self) -> None:
        #: mode -> the tickets holding the resource in it (by identity, in admission order)
        self.holders: dict[Mode, dict[Ticket, None]] = {}
        #: (order, seq-unique ticket, mode), kept sorted: the FIFO queue of this resource
        self.waiters: list[tuple[tuple[int, int, int], Ticket, Mode]] = []

    def conflicting_holder(self, mode: Mode) -> tuple[uuid.UUID, Mode] | None:
        for other in CONFLICTS[mode]:
            held = self.holders.get(other)
            if held:
                return next(iter(held)).job, other
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

    def __init__(self, policy: PolicyTable = DEFAULT_POLICY) -> None:
        self._resources: dict[str, _Resource] = {}
        self._seq = itertools.count()
        #: the policy table (data; design/scheduling.md "Policy")
        self.policy: PolicyTable = policy
        #: the tickets that hold claims, by job (its UUID as an int: a cheaper hash)
        self._held: dict[int, Ticket] = {}

    def _res(self, name: str) -> _Resource:
        res = self._resources.get(name)
        if res is None:
            res = self._resources[name] = _Resource()
        return res

    def ticket(
        self,
        job: uuid.UUID,
        claims: tuple[Claim, ...],
        priority: int = 0,
        *,
        type: str = "",
        policy: Policy | None = None,
        queue: bool = False,
    ) -> Ticket:
        return Ticket(job, claims, priority, next(self._seq), type=type, policy=policy, queue=queue)

    def number(self, ticket: Ticket) -> None:
        """Give a ticket built elsewhere its place in arrival order."""
        ticket.seq = next(self._seq)

    def probe(self, ticket: Ticket) -> Ticket:
        """A copy of ``ticket`` numbered as the next ticket would be, numbering nothing:
        what explain asks ``verdict`` about."""
        seq = next(self._seq)
        self._seq = itertools.count(seq)
        return Ticket(
            ticket.job,
            ticket.claims,
            ticket.priority,
            seq,
            type=ticket.type,
            policy=ticket.policy,
            queue=ticket.queue,
        )

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

    def blockers(self, ticket: Ticket) -> list[Conflict]:
        """Every job that keeps ``ticket`` out (holders, and earlier waiters), one entry
        per job: its first contested claim, in claim order."""
        return [c for c, _ in self._blockers(ticket)]

    def _blockers(self, ticket: Ticket) -> list[tuple[Conflict, Ticket | None]]:
        found: dict[uuid.UUID, tuple[Conflict, Ticket | None]] = {}
        for claim in ticket.claims:
            res = self._resources.get(claim.resource)
            if res is None:
                continue
            for other in CONFLICTS[claim.mode]:
                for holder in res.holders.get(other, ()):
                    job = holder.job
                    if job != ticket.job and job not in found:
                        found[job] = (Conflict(job, other, claim, False), holder)
            for order, waiter, wmode in res.waiters:
                if order >= ticket.order:
                    break
                if wmode in CONFLICTS[claim.mode] and waiter.job != ticket.job:
                    found.setdefault(waiter.job, (Conflict(waiter.job, wmode, claim, True), waiter))
        return list(found.values())

    def rule_for(self, holder_type: str, incoming_type: str) -> Policy | None:
        """The policy table's rule for a pair of job types, most specific first."""
        table = self.policy
        for key in (
            (holder_type, incoming_type),
            (holder_type, ANY),
            (ANY, incoming_type),
            (ANY, ANY),
        ):
            rule = table.get(key)
            if rule is not None:
                return rule
        return None

    def decide(self, ticket: Ticket, c: Conflict) -> Conflict:
        """``c`` (a blocker ``conflict`` or ``blockers`` found for ``ticket``) with the
        policy that applies to it and the rule that says so (group admission uses it)."""
        other = self._held.get(c.holder.int)
        if c.waiting:
            other = next(
                (w for _, w, _ in self._resources[c.claim.resource].waiters if w.job == c.holder),
                None,
            )
        return self._decide(ticket, c, other)

    def _decide(self, ticket: Ticket, c: Conflict, other: Ticket | None) -> Conflict:
        """``c`` (blocker ``other``'s) with the policy that applies and the rule saying so."""
        holder = None if c.waiting else other
        holder_type = "" if other is None else other.type
        if ticket.policy is not None:
            policy, source = ticket.policy, f"the job's <policy conflict='{ticket.policy}'/>"
        else:
            rule = self.rule_for(holder_type, ticket.type) if holder_type else None
            if rule is not None:
                policy, source = rule, f"policy table: {holder_type} vs {ticket.type}"
                name = table_name(self.policy)
                if name is not None:
                    source += f", table '{name}'"
            elif ticket.queue:
                policy, source = Policy.QUEUE, "the job asked to queue"
            else:
                policy, source = Policy.REJECT, "default: fail fast"
        if policy is Policy.PREEMPT:
            why = None
            if holder is None:
                why = "an earlier waiter is never preempted"
            elif holder.preempted:
                why = "the holder is already being preempted"
            elif ticket.priority <= holder.priority:
                why = f"priority {ticket.priority} is not above the holder's {holder.priority}"
            if why is not None:
                policy = Policy.QUEUE if ticket.queue else Policy.REJECT
                source = f"{source}; cannot preempt ({why}), so {policy}"
        role = "queued before it" if c.waiting else "held"
        text = f"{c.mode.value} ({role}) excludes {c.claim.mode.value}: {policy} ({source})"
        return Conflict(c.holder, c.mode, c.claim, c.waiting, text, policy)

    def verdict(self, ticket: Ticket, *, every_blocker: bool = True) -> Verdict:
        """The admission decision for ``ticket`` now (changes nothing): ADMIT with no
        blocker; else CONFLICT if a blocker's policy is reject, QUEUE if one's is queue,
        PREEMPT if every blocker is a holder it may preempt. Without ``every_blocker``
        (begin), when no rule can tell blockers apart (an empty table, no policy of the
        job's own: every blocker gets the job's own choice) only the first is looked
        for, so a refusal costs what it did before policies."""
        if not every_blocker and not self.policy and ticket.policy is None:
            first = self.conflict(ticket)
            if first is None:
                return _ADMIT
            c = self._decide(ticket, first, None)
            return Verdict(Decision.QUEUE if ticket.queue else Decision.CONFLICT, (c,))
        found = tuple(self._decide(ticket, c, t) for c, t in self._blockers(ticket))
        if not found:
            return _ADMIT
        policies = {c.policy for c in found}
        if Policy.REJECT in policies:
            decision = Decision.CONFLICT
        elif Policy.QUEUE in policies:
            decision = Decision.QUEUE
        else:
            decision = Decision.PREEMPT
        return Verdict(decision, found)

    def apply(self, ticket: Ticket, verdict: Verdict) -> None:
        """Do what ``verdict`` (of ``ticket``, in this state) says: hold (ADMIT), queue
        (QUEUE, and PREEMPT: the preemptor waits ahead until its victims let go, see
        ``suspend``), or raise JobConflict naming the blocker whose policy refuses."""
        if verdict.decision is Decision.ADMIT:
            self._admit(ticket)
        elif verdict.decision is Decision.CONFLICT:
            refusing = [c for c in verdict.blockers if c.policy is Policy.REJECT]
            raise _conflict_error(ticket, refusing[0])
        else:
            ticket.leading = verdict.decision is Decision.PREEMPT
            self._enqueue(ticket)

    def end_lead(self, ticket: Ticket) -> None:
        """A preemptor still waiting once its victims had their time: it waits in its
        own place from now on."""
        if not ticket.leading:
            return
        ticket.leading = False
        if ticket.waiting:
            self._resort(self._resources[c.resource] for c in ticket.claims)

    def try_admit(self, ticket: Ticket) -> None:
        """Admit now or raise JobConflict naming the holder and the resource."""
        found = self.conflict(ticket)
        if found is not None:
            raise _conflict_error(ticket, found)
        self._admit(ticket)

    def admit_or_enqueue(self, ticket: Ticket) -> bool:
        """Admit now (True) or put the ticket in the FIFO queues (False)."""
        if self.conflict(ticket) is None:
            self._admit(ticket)
            return True
        self._enqueue(ticket)
        return False

    def _enqueue(self, ticket: Ticket) -> None:
        ticket.waiting = True
        for claim in ticket.claims:
            bisect.insort(
                self._res(claim.resource).waiters,
                (ticket.order, ticket, claim.mode),
                key=lambda w: w[0],
            )

    def suspend(self, ticket: Ticket) -> list[Ticket]:
        """A preempted holder (paused) gives its resources up and waits for them again
        in its queue place; returns the waiting tickets admitted as a result."""
        ticket.preempted = True
        admitted = self.release(ticket)
        self._enqueue(ticket)
        return admitted

    def _admit(self, ticket: Ticket) -> None:
        """Hold ``ticket``'s claims, and age the waiters it overtakes (if a resource it
        holds has waiters: none can be overtaken otherwise)."""
        if self._hold(ticket):
            self._age_overtaken(ticket)

    def _age_overtaken(self, ticket: Ticket) -> None:
        """Each waiter that arrived before ``ticket`` and that one of its claims blocks
        gains AGING_BOOST queue levels (once per admission)."""
        aged: dict[int, Ticket] = {}
        for claim in ticket.claims:
            res = self._resources[claim.resource]
            for _, waiter, wmode in res.waiters:
                if waiter.seq < ticket.seq and wmode in CONFLICTS[claim.mode]:
                    aged[id(waiter)] = waiter
        if not aged:
            return
        touched: dict[int, _Resource] = {}
        for waiter in aged.values():
            waiter.boost += AGING_BOOST
            for claim in waiter.claims:
                res = self._resources[claim.resource]
                touched[id(res)] = res
        self._resort(touched.values())

    @staticmethod
    def _resort(touched: Iterable[_Resource]) -> None:
        for res in touched:  # each queue sorted again once, in its new order
            res.waiters = sorted(
                ((t.order, t, mode) for _, t, mode in res.waiters), key=lambda w: w[0]
            )

    def _hold(self, ticket: Ticket) -> bool:
        """Hold ``ticket``'s claims; whether a resource it now holds has waiters."""
        resources = self._resources
        queued = False
        for claim in ticket.claims:
            res = resources.get(claim.resource)
            if res is None:
                res = resources[claim.resource] = _Resource()
            elif res.waiters:
                queued = True
            held = res.holders.get(claim.mode)
            if held is None:
                res.holders[claim.mode] = {ticket: None}
            else:
                held[ticket] = None
        self._held[ticket.job.int] = ticket
        return queued

    def release(self, ticket: Ticket) -> list[Ticket]:
        """Drop a ticket (held or waiting); return waiting tickets admitted as a result."""
        resources = self._resources
        waiting = ticket.waiting
        queued: list[_Resource] = []  # touched resources with waiters
        for claim in ticket.claims:
            name = claim.resource
            res = resources.get(name)
            if res is None:
                continue
            holders = res.holders
            if waiting:
                res.remove_waiter(ticket)
            else:
                held = holders.get(claim.mode)
                if held is not None:
                    held.pop(ticket, None)
                    if not held:  # (a mode nobody holds has no entry: empty() is cheap)
                        del holders[claim.mode]
            if res.waiters:
                queued.append(res)
            elif not holders:  # nobody holds or waits: forgotten in the same pass
                del resources[name]
        if not waiting:
            self._held.pop(ticket.job.int, None)
        ticket.waiting = False
        if not queued:
            return []
        admitted = self._wake(queued)
        for claim in ticket.claims:
            res = resources.get(claim.resource)
            if res is not None and res.empty():
                del resources[claim.resource]
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
            if ticket.waiting and self.conflict(ticket) is None:
                self._dequeue(ticket)
                self._admit(ticket)
                admitted.append(ticket)
        return admitted

    # ---- job groups (design/scheduling.md "Job groups") --------------------------------

    def _first_conflict(self, tickets: Iterable[Ticket]) -> tuple[Ticket, Conflict] | None:
        for ticket in tickets:
            found = self.conflict(ticket)
            if found is not None:
                return ticket, found
        return None

    def verdict_all(
        self, tickets: Sequence[Ticket], *, every_blocker: bool = False
    ) -> GroupVerdict:
        """The admission decision for a job group's tickets now (changes nothing): each
        member's own ``verdict`` (begin's: its policy per blocker, from the table, its own
        ``<policy>`` and its queue choice), and the group's: CONFLICT if a member's is,
        else QUEUE if one's is, else PREEMPT if one's is, else ADMIT (the tickets must not
        conflict among themselves: the engine checks that first). ``every_blocker`` as
        for ``verdict`` (explain lists them all; the decisions are the same)."""
        members = tuple(self.verdict(t, every_blocker=every_blocker) for t in tickets)
        found = {v.decision for v in members}
        for decision in (Decision.CONFLICT, Decision.QUEUE, Decision.PREEMPT):
            if decision in found:
                return GroupVerdict(decision, members)
        return GroupVerdict(Decision.ADMIT, members)

    def apply_all(
        self, tickets: Sequence[Ticket], verdict: GroupVerdict, *, together: bool
    ) -> list[bool]:
        """Do what ``verdict_all`` said, for every ticket or none: CONFLICT raises
        JobConflict naming the first member refused and its blocker; ADMIT holds every
        ticket; otherwise ``together`` (an all-or-nothing group) queues every ticket,
        linked, to be admitted all at once when none conflicts (a PREEMPT group: once
        its victims let go), and an independent group's members each do as their own
        verdict says (held, or queued). Which tickets are held, in order."""
        if verdict.decision is Decision.CONFLICT:
            ticket, c = verdict.refusal(tickets)
            role = "queued before it for" if c.waiting else "holding"
            raise JobConflict(
                f"group member job '{ticket.job}' conflicts with job '{c.holder}' {role} "
                f"'{c.claim.resource}' ({c.mode.value} excludes {c.claim.mode.value}): "
                "no member was begun",
                holder=c.holder,
                resource=c.claim.resource,
            )
        if verdict.decision is Decision.ADMIT:
            for ticket in tickets:
                self._hold(ticket)
            return [True] * len(tickets)
        if together:
            group = tuple(tickets)
            for ticket in tickets:
                ticket.together = group
                ticket.leading = verdict.decision is Decision.PREEMPT
                self._enqueue(ticket)
            return [False] * len(tickets)
        held = []
        for ticket, member in zip(tickets, verdict.members, strict=True):
            if member.decision is Decision.ADMIT:
                self._hold(ticket)
            else:
                ticket.leading = member.decision is Decision.PREEMPT
                self._enqueue(ticket)
            held.append(member.decision is Decision.ADMIT)
        return held

    def admit_or_enqueue_together(self, tickets: Sequence[Ticket]) -> bool:
        """Admit every ticket now (True) or queue every one (False): the linked tickets
        (``together``) of a queued all-or-nothing group, queued again after a restart."""
        if self._first_conflict(tickets) is None:
            for ticket in tickets:
                self._hold(ticket)
            return True
        for ticket in tickets:
            self._enqueue(ticket)
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
        ticket.waiting = ticket.leading = False

    def holders(self, resource: str) -> dict[Mode, list[uuid.UUID]]:
        res = self._resources.get(resource)
        return {} if res is None else {m: [t.job for t in h] for m, h in res.holders.items() if h}

    def resource_count(self) -> int:
        return len(self._resources)

    def position(self, ticket: Ticket) -> int | None:
        """A waiting ticket's place: 1 + the waiters ahead of it on any of its resources
        (each counted once); None if it does not wait."""
        if not ticket.waiting:
            return None
        ahead: set[int] = set()
        for claim in ticket.claims:
            res = self._resources.get(claim.resource)
            if res is None:
                continue
            for order, waiter, _ in res.waiters:
                if waiter is ticket or order >= ticket.order:
                    break
                ahead.add(id(waiter))
        return len(ahead) + 1

    def held(self, job: uuid.UUID) -> Ticket | None:
        """The ticket ``job`` holds claims with, if any."""
        return self._held.get(job.int)


def _conflict_error(ticket: Ticket, found: Conflict) -> JobConflict:
    role = "queued before it for" if found.waiting else "holding"
    return JobConflict(
        f"job '{ticket.job}' conflicts with job '{found.holder}' {role} "
        f"'{found.claim.resource}' ({found.mode.value} excludes "
        f"{found.claim.mode.value})",
        holder=found.holder,
        resource=found.claim.resource,
    )
