"""Admission rules: the contract's default conflicts, FIFO queues, priorities."""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobcore.errors import JobConflict
from jobcore.scheduler import CONFLICTS, Claim, Decision, Mode, Scheduler, Ticket, normalize_path

DOM = "domain:vm1"
VDA = "disk:vm1/vda"
VDB = "disk:vm1/vdb"


def backup(*disks: str, target: str | None = None) -> tuple[Claim, ...]:
    claims = [Claim(DOM, Mode.DOMAIN_SHARED)] + [Claim(d, Mode.READ) for d in disks]
    if target:
        claims.append(Claim(f"file:{target}", Mode.WRITE))
    return tuple(claims)


def chain(disk: str) -> tuple[Claim, ...]:
    return (Claim(DOM, Mode.DOMAIN_SHARED), Claim(disk, Mode.CHAIN))


MIGRATION = (Claim(DOM, Mode.DOMAIN_EXCLUSIVE),)


def admit(s: Scheduler, claims: tuple[Claim, ...]) -> Ticket:
    t = s.ticket(uuid.uuid4(), claims)
    s.try_admit(t)
    return t


def test_contract_default_conflicts() -> None:
    s = Scheduler()
    b1 = admit(s, backup(VDA, VDB, target="/t1"))
    admit(s, backup(VDA, target="/t2"))  # backups of the same disk run together
    with pytest.raises(JobConflict) as err:  # a backup reading vda excludes a pull of vda
        admit(s, chain(VDA))
    assert err.value.resource == VDA and err.value.holder == b1.job
    assert str(b1.job) in str(err.value) and VDA in str(err.value)
    with pytest.raises(JobConflict):  # migration excludes every other job
        admit(s, MIGRATION)
    with pytest.raises(JobConflict) as err2:  # same target file
        admit(s, backup(VDB, target="/t1"))
    assert err2.value.resource == "file:/t1"


def test_chain_jobs_on_one_disk_exclude_each_other_not_across_disks() -> None:
    s = Scheduler()
    pull = admit(s, chain(VDA))
    admit(s, chain(VDB))
    with pytest.raises(JobConflict) as err:
        admit(s, chain(VDA))
    assert err.value.holder == pull.job
    s.release(pull)
    admit(s, chain(VDA))


def test_migration_excludes_and_is_excluded() -> None:
    s = Scheduler()
    mig = admit(s, MIGRATION)
    for claims in (chain(VDA), backup(VDB), MIGRATION):
        with pytest.raises(JobConflict) as err:
            admit(s, claims)
        assert err.value.holder == mig.job and err.value.resource == DOM
    s.release(mig)
    admit(s, chain(VDA))
    with pytest.raises(JobConflict):
        admit(s, MIGRATION)


def test_queue_is_fifo_and_release_admits_in_order() -> None:
    s = Scheduler()
    holder = admit(s, chain(VDA))
    waiters = [s.ticket(uuid.uuid4(), chain(VDA)) for _ in range(3)]
    for w in waiters:
        assert s.admit_or_enqueue(w) is False
    # a non-queueing job may not jump the queue either
    with pytest.raises(JobConflict) as err:
        admit(s, chain(VDA))
    assert err.value.holder in {holder.job, waiters[0].job}
    order = []
    current = holder
    for _ in waiters:
        woken = s.release(current)
        assert len(woken) == 1
        order.append(woken[0])
        current = woken[0]
    assert order == waiters
    assert s.release(current) == []
    assert s.resource_count() == 0


def test_priority_orders_the_queue() -> None:
    s = Scheduler()
    holder = admit(s, MIGRATION)
    low = s.ticket(uuid.uuid4(), chain(VDA), priority=0)
    high = s.ticket(uuid.uuid4(), chain(VDA), priority=10)
    s.admit_or_enqueue(low)
    s.admit_or_enqueue(high)
    assert s.release(holder) == [high]
    assert s.release(high) == [low]


def test_non_conflicting_waiters_are_admitted_together() -> None:
    s = Scheduler()
    mig = admit(s, MIGRATION)
    a = s.ticket(uuid.uuid4(), backup(VDA, target="/a"))
    b = s.ticket(uuid.uuid4(), chain(VDB))
    s.admit_or_enqueue(a)
    s.admit_or_enqueue(b)
    assert set(map(id, s.release(mig))) == {id(a), id(b)}


def test_cancelled_waiter_unblocks_those_behind_it() -> None:
    s = Scheduler()
    admit(s, backup(VDA, target="/x"))
    pull = s.ticket(uuid.uuid4(), chain(VDA))
    s.admit_or_enqueue(pull)
    b2 = s.ticket(uuid.uuid4(), chain(VDB))
    assert s.admit_or_enqueue(b2) is True  # no conflict with the waiting vda pull
    s.release(pull)  # the waiter goes away
    assert s.conflict(s.ticket(uuid.uuid4(), backup(VDA, target="/y"))) is None


def test_conflict_matrix_is_symmetric() -> None:
    for a in Mode:
        for b in CONFLICTS[a]:
            assert a in CONFLICTS[b]


claims_strategy = st.sampled_from(
    [
        backup(VDA, target="/a"),
        backup(VDB, target="/b"),
        backup(VDA, VDB, target="/c"),
        backup(VDA, target="/a"),
        chain(VDA),
        chain(VDB),
        MIGRATION,
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), claims_strategy, st.integers(0, 2), st.integers(0, 30)),
        max_size=40,
    )
)
def test_conflicting_tickets_are_never_held_together(
    ops: list[tuple[bool, tuple[Claim, ...], int, int]],
) -> None:
    s = Scheduler()
    held: list[Ticket] = []
    queued: list[Ticket] = []
    for queue, claims, prio, release_pick in ops:
        if held and release_pick % 3 == 0:
            victim = held.pop(release_pick % len(held))
            for t in s.release(victim):
                queued.remove(t)
                held.append(t)
        t = s.ticket(uuid.uuid4(), claims, prio)
        if queue:
            (held if s.admit_or_enqueue(t) else queued).append(t)
        else:
            try:
                s.try_admit(t)
                held.append(t)
            except JobConflict:
                pass
        for i, x in enumerate(held):
            for y in held[i + 1 :]:
                for cx in x.claims:
                    for cy in y.claims:
                        assert not (cx.resource == cy.resource and cy.mode in CONFLICTS[cx.mode])
    # draining releases every waiter eventually (nothing is lost)
    while held:
        for t in s.release(held.pop()):
            queued.remove(t)
            held.append(t)
    assert queued == []
    assert s.resource_count() == 0


# ---- policy, preemption verdicts, aging (design/scheduling.md) -------------------------


def test_verdict_follows_the_policy_table_and_the_jobs_own_policy() -> None:
    from jobcore.scheduler import KUBEVIRT_POLICY, Decision, Policy

    s = Scheduler(KUBEVIRT_POLICY)
    b = s.ticket(uuid.uuid4(), backup(VDA, target="/t"), type="backup")
    s.try_admit(b)
    mig = s.ticket(uuid.uuid4(), MIGRATION, 1, type="migration")
    v = s.verdict(mig)
    assert v.decision is Decision.PREEMPT and v.victims == (b.job,)
    assert "policy table: backup vs migration" in v.blockers[0].rule
    same = s.ticket(uuid.uuid4(), MIGRATION, 0, type="migration", queue=True)
    assert s.verdict(same).decision is Decision.QUEUE  # no higher priority: its own choice
    pull = s.ticket(uuid.uuid4(), chain(VDA), 3, type="blockpull", policy=Policy.PREEMPT)
    assert s.verdict(pull).decision is Decision.PREEMPT
    pull2 = s.ticket(uuid.uuid4(), chain(VDA), 3, type="blockpull")
    assert s.verdict(pull2).decision is Decision.CONFLICT
    assert s.verdict(s.ticket(uuid.uuid4(), backup(VDB))).decision is Decision.ADMIT


def test_a_suspended_victim_waits_and_comes_back_after_its_preemptor() -> None:
    from jobcore.scheduler import Decision, Policy

    s = Scheduler()
    victim = admit(s, backup(VDA))
    boss = s.ticket(uuid.uuid4(), chain(VDA), 5, policy=Policy.PREEMPT)
    verdict = s.verdict(boss)
    assert verdict.decision is Decision.PREEMPT
    s.apply(boss, verdict)
    assert boss.waiting
    assert s.suspend(victim) == [boss] and victim.waiting
    assert s.release(boss) == [victim] and not victim.waiting


@settings(max_examples=200, deadline=None)
@given(
    low=st.integers(-1000, 1000),
    stream=st.lists(st.integers(-1000, 1000), min_size=1, max_size=60),
)
def test_aging_bounds_how_often_a_queued_job_is_overtaken(low: int, stream: list[int]) -> None:
    """Property: a queued job is overtaken at most (p - low) / AGING_BOOST times by jobs
    of priority <= p, however they arrive: here a new conflicting job queues each time
    the holder ends (the worst steady stream)."""
    from jobcore.scheduler import AGING_BOOST

    s = Scheduler()
    holders = [admit(s, backup(VDA))]
    waiter = s.ticket(uuid.uuid4(), chain(VDA), low)
    assert not s.admit_or_enqueue(waiter)
    top = max(stream)
    overtaken = 0
    for prio in stream:
        nxt = s.ticket(uuid.uuid4(), backup(VDA), prio)
        if s.admit_or_enqueue(nxt):  # admitted beside the holders, ahead of the waiter
            holders.append(nxt)
            overtaken += 1
        admitted = s.release(holders.pop(0))
        if waiter in admitted or not waiter.waiting:
            break
        overtaken += len(admitted)
        holders += admitted
    assert overtaken <= max(0, top - low) // AGING_BOOST + 1
    assert waiter.boost == overtaken * AGING_BOOST
    while holders and waiter.waiting:  # once the stream stops, it runs
        s.release(holders.pop(0))
    assert not waiter.waiting


def test_decide_gives_a_found_blocker_its_policy_and_rule() -> None:
    from jobcore.scheduler import KUBEVIRT_POLICY, Policy

    s = Scheduler(KUBEVIRT_POLICY)
    b = s.ticket(uuid.uuid4(), backup(VDA), type="backup")
    s.try_admit(b)
    waiter = s.ticket(uuid.uuid4(), chain(VDA), type="blockpull", queue=True)
    assert not s.admit_or_enqueue(waiter)
    mig = s.ticket(uuid.uuid4(), MIGRATION, 1, type="migration")
    found = s.conflict(mig)
    assert found is not None and found.rule == ""  # conflict(): the first blocker, raw
    decided = s.decide(mig, found)
    assert decided.policy is Policy.PREEMPT and "policy table: backup vs migration" in decided.rule
    pull = s.ticket(uuid.uuid4(), chain(VDA), type="blockpull")
    (held, queued) = s.blockers(pull)
    assert s.decide(pull, held).policy is Policy.REJECT
    assert queued.waiting and "queued before it" in s.decide(pull, queued).rule


CLAIM_SETS = [backup(VDA, target="/a"), backup(VDB), chain(VDA), chain(VDB), MIGRATION]


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, len(CLAIM_SETS) - 1), st.integers(-2, 2), st.booleans()),
        min_size=1,
        max_size=15,
    )
)
def test_begins_short_verdict_decides_as_the_full_one(steps: list[tuple[int, int, bool]]) -> None:
    """Property: with no policy table and no job policy, begin's verdict (the first
    blocker only) decides as explain's (every blocker), naming one of its blockers."""
    s = Scheduler()
    for which, priority, queue in steps:
        t = s.ticket(uuid.uuid4(), CLAIM_SETS[which], priority, queue=queue)
        full, short = s.verdict(t), s.verdict(t, every_blocker=False)
        assert short.decision is full.decision
        assert {c.holder for c in short.blockers} <= {c.holder for c in full.blockers}
        if full.decision is not Decision.CONFLICT:
            s.apply(t, short)


def _realpath_spelling(path: str) -> str:
    """normalize_path's rule in its plain form: realpath of the directory, the last
    component as written."""
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    head, tail = os.path.split(path)
    if tail in ("", ".", ".."):
        return os.path.realpath(path)
    return os.path.join(os.path.realpath(head), tail)


def test_normalize_path_spells_as_realpath_through_links_and_odd_spellings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk that skips realpath when no component is a link gives realpath's answer:
    symbolic links (absolute, relative, dangling, looping) anywhere in the directory,
    missing components, a file where a directory should be, '.', '..', '//', relative
    paths; and a link made after a first call is seen at the next (nothing is cached)."""
    root = tmp_path / "r"
    (root / "a" / "b").mkdir(parents=True)
    (root / "file").write_text("")
    (root / "l").symlink_to(root / "a")
    (root / "a" / "lb").symlink_to("b")
    (root / "dang").symlink_to("nowhere")
    (root / "loop1").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop1")
    parts = ["a", "b", "l", "lb", "dang", "file", "x", ".", "..", "", ".hid", "loop1"]
    monkeypatch.chdir(root)
    checked = 0
    for depth in (1, 2, 3):
        for combo in itertools.product(parts, repeat=depth):
            for lead in (str(root), "/", "", "rel"):
                for end in ("/t.qcow2", "", "/"):
                    path = (lead + "/" if lead else "") + "/".join(combo) + end
                    if path:
                        assert normalize_path(path) == _realpath_spelling(path), path
                        checked += 1
    assert checked > 5000
    later = root / "a" / "b" / "later"
    assert normalize_path(f"{later}/t") == f"{later}/t"
    later.symlink_to(root)
    assert normalize_path(f"{later}/t") == f"{root}/t"


# ---- release's one pass (design/scheduling.md "Fast paths of an instant job") -----------


class AsBefore(Scheduler):
    """``release`` and ``_admit`` as they were written before their fast paths (one
    pass; aging looked for only where a held resource has waiters): the reference."""

    def _admit(self, ticket: Ticket) -> None:
        Scheduler._hold(self, ticket)
        self._age_overtaken(ticket)

    def release(self, ticket: Ticket) -> list[Ticket]:
        resources = self._resources
        waiting = ticket.waiting
        touched = []
        queued = False
        for claim in ticket.claims:
            res = resources.get(claim.resource)
            if res is None:
                continue
            if waiting:
                res.remove_waiter(ticket)
            else:
                held = res.holders.get(claim.mode)
                if held is not None:
                    held.pop(ticket, None)
            touched.append(res)
            if res.waiters:
                queued = True
        if not waiting:
            self._held.pop(ticket.job.int, None)
        ticket.waiting = False
        admitted = self._wake(touched) if queued else []
        for claim in ticket.claims:
            res = resources.get(claim.resource)
            if res is not None and res.empty():
                del resources[claim.resource]
        return admitted


def scheduler_state(s: Scheduler) -> dict[str, Any]:
    """What a scheduler holds, by job numbers: each resource's holders per mode (modes
    held by nobody left out) and its queue (with each waiter's aging)."""
    return {
        name: (
            {m: [t.seq for t in h] for m, h in res.holders.items() if h},
            [(t.seq, m, t.boost) for _, t, m in res.waiters],
        )
        for name, res in s._resources.items()
    }


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), claims_strategy, st.integers(0, 2), st.integers(0, 30)),
        max_size=40,
    )
)
def test_admission_and_release_fast_paths_leave_what_the_slow_ones_left(
    ops: list[tuple[bool, tuple[Claim, ...], int, int]],
) -> None:
    fast, slow = Scheduler(), AsBefore()
    tickets: list[tuple[Ticket, Ticket]] = []  # (fast's, slow's), held or waiting
    for queue, claims, prio, pick in ops:
        if tickets and pick % 3 == 0:  # drop one, held or waiting
            tf, ts = tickets.pop(pick % len(tickets))
            assert [t.seq for t in fast.release(tf)] == [t.seq for t in slow.release(ts)]
        job = uuid.uuid4()
        tf, ts = fast.ticket(job, claims, prio), slow.ticket(job, claims, prio)
        if queue:
            assert fast.admit_or_enqueue(tf) == slow.admit_or_enqueue(ts)
            tickets.append((tf, ts))
        elif fast.conflict(tf) is None:
            assert slow.conflict(ts) is None
            fast.try_admit(tf)
            slow.try_admit(ts)
            tickets.append((tf, ts))
        assert scheduler_state(fast) == scheduler_state(slow)
        assert fast.resource_count() == slow.resource_count()
    while tickets:
        tf, ts = tickets.pop(0)
        assert [t.seq for t in fast.release(tf)] == [t.seq for t in slow.release(ts)]
        assert scheduler_state(fast) == scheduler_state(slow)
    assert fast.resource_count() == slow.resource_count() == 0
