"""Job groups: several jobs, on any domains of one connection, begun as one
(design/scheduling.md "Job groups").

A group is begun atomically through ``Engine.begin_all``: every member prepared and
checked first (any refusal: nothing begun), then all admitted at once, or all queued, or
none (JobConflict naming the member and the holder). Then, by its mode:

- ``all-or-nothing``: a member that fails or is cancelled cancels the others (as QEMU's
  job transactions do); a member whose work is done waits, still running, until every
  member is done (its completion held back: ``Engine.completion_gate``); then all
  complete together, or, if one failed meanwhile, the waiting ones end cancelled and the
  checkpoints their backups created are deleted (bitmaps merged into their parents). So a
  group never ends with some members completed and others failed or cancelled, and its
  checkpoints are kept only if every member completed.
- ``independent``: members run on their own once begun.

The group's state is derived from its members' states by ``GROUP_STATE_TABLE`` (data).
Groups live beside the connection's engine; a durable store keeps each group's record
(``JobGroups``), read back at the next open before the engine recovers the members, so
a member whose completion was held is held again (design/scheduling.md "A restart").
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping

import anyio
from attrs import frozen

from jobcore.driver import Concluded
from jobcore.engine import Engine
from jobcore.errors import InvalidArgument, JobError, NoSuchJob
from jobcore.flags import check_flags
from jobcore.info import Explanation, GroupInfo
from jobcore.lifecycle import JobState
from jobcore.log import get_logger
from jobcore.paths import PathGuard
from jobcore.spec import check_timeout
from jobcore.store import JobRecord
from jobcore.xml.group import GroupMode, JobGroupSpec

S = JobState
_log = get_logger("jobcore.groups")


class GroupState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    ABORTING = "aborting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: ended with some members completed and others not (independent groups; an
    #: all-or-nothing one only from a store an earlier version wrote)
    PARTIAL = "partial"


class Member(enum.StrEnum):
    """What the state table looks at: each member's kind of state, and the group's own."""

    QUEUED = "queued"
    #: any active state but queued (a member whose completion is held back included)
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: the group is being aborted (JobGroupAbort; all-or-nothing: a member did not complete)
    ABORT = "abort"


@frozen
class StateRule:
    """The group is in ``state`` when the kinds present include one of ``any_of`` and
    none of ``none_of``; the first rule that matches wins."""

    state: GroupState
    any_of: frozenset[Member]
    none_of: frozenset[Member]


M = Member
_ACTIVE = frozenset({M.QUEUED, M.ACTIVE})
#: the group's state from the kinds of its members' states (first match wins)
GROUP_STATE_TABLE: tuple[StateRule, ...] = (
    StateRule(GroupState.ABORTING, frozenset({M.ABORT}), frozenset()),
    StateRule(GroupState.QUEUED, frozenset({M.QUEUED}), frozenset({M.ACTIVE, M.COMPLETED})),
    StateRule(GroupState.RUNNING, _ACTIVE, frozenset()),
    StateRule(GroupState.COMPLETED, frozenset({M.COMPLETED}), frozenset({M.FAILED, M.CANCELLED})),
    StateRule(GroupState.PARTIAL, frozenset({M.COMPLETED}), frozenset()),
    StateRule(GroupState.FAILED, frozenset({M.FAILED}), frozenset()),
    StateRule(GroupState.CANCELLED, frozenset({M.CANCELLED}), frozenset()),
)
del M


def group_state(kinds: Iterable[Member]) -> GroupState:
    present = frozenset(kinds)
    for rule in GROUP_STATE_TABLE:
        if present & rule.any_of and not present & rule.none_of:
            return rule.state
    raise AssertionError(f"no group state for {sorted(present)}")  # the table covers all


def render_state_table() -> str:
    """design/scheduling.md's group state table (a test checks the document holds it)."""
    lines = ["| group state | when one of these is present | and none of these |", "|---|---|---|"]
    for rule in GROUP_STATE_TABLE:
        cells = (
            f"`{rule.state}`",
            ", ".join(f"`{k}`" for k in sorted(rule.any_of)),
            ", ".join(f"`{k}`" for k in sorted(rule.none_of)) or "–",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def member_kind(state: JobState) -> Member:
    """The kind of a member's state the state table looks at."""
    if state is S.QUEUED:
        return Member.QUEUED
    if state.active:
        return Member.ACTIVE
    return Member(str(state))


class JobGroup:
    """One group of a connection: its members' records, its mode, the rules of its mode."""

    def __init__(
        self,
        engine: Engine,
        group_id: uuid.UUID,
        mode: GroupMode,
        created: float | None = None,
        save: Callable[[JobGroup], None] | None = None,
    ) -> None:
        self.engine = engine
        #: writes the group's record to the store (a durable one), or None
        self._save = save
        self.uuid = group_id
        self.mode = mode
        self.records: list[JobRecord] = []
        self.created_wall = engine.clock.wall() if created is None else float(created)
        self.ended_wall: float | None = None
        #: all-or-nothing: completions held back, by job (their reports' extra stats)
        self._held: dict[uuid.UUID, Mapping[str, int | str] | None] = {}
        #: members being rolled back or aborted by the group (tasks not yet done)
        self._pending = 0
        self._aborting = False
        #: an all-or-nothing group's mixed end was undone (its checkpoints: _mixed_end)
        self._undone_completed = False
        #: read back from the store, its members being recovered: the hooks only record
        #: what happens (held completions, ends) until ``restored`` applies the rules
        self._restoring = False
        self._settled = anyio.Event()

    def __repr__(self) -> str:
        return f"<JobGroup {self.uuid} {self.mode} {self.state}>"

    # ---- hooks (Engine.begin_all's on_created, then the engine's member hooks) --------

    def attach(self, records: list[JobRecord], *, only_active: bool = False) -> None:
        self.records = records
        for rec in records:
            if only_active and rec.state.terminal:
                continue
            self.engine.member_ended[rec.uuid] = self._member_ended
            if self.mode is GroupMode.ALL_OR_NOTHING:
                self.engine.completion_gate[rec.uuid] = self._gate

    def record(self) -> dict[str, object]:
        """What the store keeps of the group (JSON)."""
        return {
            "mode": str(self.mode),
            "jobs": [str(r.uuid) for r in self.records],
            "created": self.created_wall,
            # completions held back (their reports' extra stats): held again after a restart
            "held": {str(k): dict(v or {}) for k, v in self._held.items()},
        }

    def restored(self) -> None:
        """Read again after a restart, its members recovered: what ended meanwhile
        decides, as it would have. A member the driver found done was held again by the
        gate (``Engine._recovered``): all complete now if every member is done, or the
        held ones are undone if one failed or was cancelled."""
        self._restoring = False
        ended_badly = [r for r in self.records if r.state in (S.FAILED, S.CANCELLED)]
        if self.mode is GroupMode.ALL_OR_NOTHING and ended_badly:
            rec = ended_badly[0]
            self._abort_others(f"group member '{rec.uuid}' on '{rec.domain}' {rec.state}")
        elif self._held:
            self._release_if_all_done()
        self._check_settled()

    def _gate(self, rec: JobRecord, extra: Mapping[str, int | str] | None) -> bool:
        """The driver reports ``rec`` completed: hold it until every member is done."""
        self._held[rec.uuid] = extra
        self.engine.held_abort[rec.uuid] = self._abort_held
        rec.processed = rec.total or rec.processed  # its work is done (info shows it)
        if self._save is not None and not self._restoring:  # with the report's writes
            self._save(self)
        if self._restoring:  # recovered after a restart: ``restored`` decides
            return True
        if self._aborting:  # a sibling already failed: undo this one
            self._spawn(self._roll_back, rec)
            return True
        self._release_if_all_done()
        return True

    def _release_if_all_done(self) -> None:
        if all(r.uuid in self._held or r.state is S.COMPLETED for r in self.records):
            # all done: all complete, in document order (a member may have completed
            # already: released before a restart, its siblings' commits not)
            for member in [r for r in self.records if r.uuid in self._held]:
                self.engine.release_completion(member, self._held.pop(member.uuid))

    def _member_ended(self, rec: JobRecord) -> None:
        if self._restoring:  # recovered after a restart: ``restored`` decides
            return
        if self.mode is GroupMode.ALL_OR_NOTHING and rec.state is not S.COMPLETED:
            self._abort_others(f"group member '{rec.uuid}' on '{rec.domain}' {rec.state}")
        self._check_settled()

    # ---- abort ----------------------------------------------------------------------

    def _abort_others(self, why: str, *, spawn: bool = True) -> None:
        first = not self._aborting and spawn
        self._aborting = True
        if first:
            _log.info("job group aborting", group=str(self.uuid), reason=why)
        for rec in self.records:
            if rec.state.terminal:
                continue
            if rec.uuid in self._held:
                self._spawn(self._roll_back, rec)
            elif first:
                self._spawn(self._abort_member, rec)

    def _spawn(self, fn: Callable[[JobRecord], Awaitable[None]], rec: JobRecord) -> None:
        if self.engine.closing:  # it ends every active job itself, and starts nothing
            return
        self._pending += 1
        self.engine.tg.start_soon(self._run_pending, fn, rec)

    async def _run_pending(
        self, fn: Callable[[JobRecord], Awaitable[None]], rec: JobRecord
    ) -> None:
        try:
            await fn(rec)
        finally:
            self._pending -= 1
            self._check_settled()

    def _abort_held(self, rec: JobRecord) -> None:
        """A held member is aborted: as a member that did not complete, it cancels the
        others; it is undone (its checkpoint deleted) and ends cancelled."""
        self._abort_others(f"group member '{rec.uuid}' on '{rec.domain}' was aborted")

    async def _abort_member(self, rec: JobRecord) -> None:
        if rec.state.terminal or rec.uuid in self._held:
            return
        try:
            await self.engine.abort(rec)
        except JobError as exc:  # it ended meanwhile, or the driver refused
            if rec.state.active and rec.uuid not in self._held:
                _log.warning("group member not aborted", job=str(rec.uuid), error=str(exc))

    async def _roll_back(self, rec: JobRecord) -> None:
        """A held member whose group will not complete: its checkpoint goes (the bitmaps
        merged into the parent's, as a checkpoint delete does), then it ends cancelled."""
        if rec.uuid not in self._held:  # rolled back already
            return
        del self._held[rec.uuid]
        if rec.state.terminal:
            return
        await self._drop_checkpoint(rec)
        self.engine.end_held(rec, "a member of its all-or-nothing group did not complete")

    async def abort(self) -> None:
        """Abort every active member (all-or-nothing: those whose completion is held are
        undone too); returns once each abort was taken (``wait`` for the end)."""
        self._abort_others("the group was aborted", spawn=False)
        for rec in [r for r in self.records if r.state.active and r.uuid not in self._held]:
            await self._abort_member(rec)

    # ---- queries --------------------------------------------------------------------

    def _check_settled(self) -> None:
        done = self._pending == 0 and not self._held
        if done and not self._settled.is_set() and all(r.state.terminal for r in self.records):
            if self._mixed_end():
                return  # settled once the completed members' checkpoints are gone
            self.ended_wall = self.engine.clock.wall()
            self._settled.set()
            _log.info("job group ended", group=str(self.uuid), state=str(self.state))

    def _mixed_end(self) -> bool:
        """An all-or-nothing group that ended with some members completed and others
        not — only from a store an earlier version wrote (its held completions not in the
        group's record): the completed members' checkpoints go all the same (once; True
        while it runs)."""
        if self.mode is not GroupMode.ALL_OR_NOTHING or self._undone_completed:
            return False
        states = {r.state for r in self.records}
        if S.COMPLETED not in states or states == {S.COMPLETED}:
            return False
        self._undone_completed = True
        for rec in self.records:
            if rec.state is S.COMPLETED:
                self._spawn(self._drop_checkpoint, rec)
        return self._pending > 0

    async def _drop_checkpoint(self, rec: JobRecord) -> None:
        name = getattr(rec.spec, "checkpoint_name", None)
        checkpoints = self.engine.checkpoints
        cp = None if name is None else checkpoints.find(rec.domain, name)
        if cp is None or cp.job != rec.uuid:
            return
        try:
            dom = await self.engine.dconn.lookup_domain(rec.domain)
            await checkpoints.delete(dom, cp.name)
        except JobError as exc:
            _log.warning("group member's checkpoint kept", job=str(rec.uuid), error=str(exc))

    @property
    def state(self) -> GroupState:
        kinds = {member_kind(r.state) for r in self.records}
        if self._aborting and any(r.state.active for r in self.records):
            kinds.add(Member.ABORT)
        return group_state(kinds)

    def info(self) -> GroupInfo:
        states = [r.state for r in self.records]
        return GroupInfo(
            uuid=self.uuid,
            mode=str(self.mode),
            state=str(self.state),
            jobs=tuple(r.uuid for r in self.records),
            domains=tuple(r.domain for r in self.records),
            types=tuple(str(r.type) for r in self.records),
            states=tuple(str(s) for s in states),
            processed=sum(r.processed for r in self.records),
            total=sum(r.total for r in self.records),
            completed=states.count(S.COMPLETED),
            failed=states.count(S.FAILED),
            cancelled=states.count(S.CANCELLED),
            created=self.created_wall,
            ended=self.ended_wall,
        )

    async def wait(self, timeout: float | None = None) -> GroupInfo:
        """Until every member ended (and the group's rollback is done); TimeoutError
        after ``timeout``."""
        timeout = check_timeout(timeout)
        if not self._settled.is_set():
            with anyio.fail_after(timeout):
                await self._settled.wait()
        for rec in self.records:  # a durable store: the outcome is on disk first
            await self.engine.wait(rec)
        return self.info()


class JobGroups:
    """The groups of one connection, by UUID; a group is forgotten once none of its
    members is retained any more (their retention, the store's caps). Each group's UUID,
    mode and members are kept in the store (a ``group:UUID`` record of the connection's
    DriverState, the one its checkpoints use): written with the members' rows, read
    again at the next open (``restore``)."""

    def __init__(self, engine: Engine | None, *, before_recovery: bool = False) -> None:
        """``before_recovery``: made before ``engine.recover()`` (jobcore.local), so a
        restored group's hooks see what its members' recovery finds (a member the driver
        found done is held again); ``restored()`` after it applies the groups' rules."""
        self._groups: dict[uuid.UUID, JobGroup] = {}
        if engine is None:  # a connection without an engine (a test's stand-in)
            return
        self.engine = engine
        self._state = engine.checkpoints.state
        self._restore()
        if not before_recovery:
            self.restored()

    def restored(self) -> None:
        """The engine recovered the members: each restored group applies its rules."""
        for group in list(self._groups.values()):
            if group._restoring:
                group.restored()

    async def begin(
        self, spec: JobGroupSpec, flags: int = 0, *, path_guard: PathGuard | None = None
    ) -> JobGroup:
        check_flags("JobGroupBegin", flags)
        self._forget_gone()
        group_id = spec.uuid if spec.uuid is not None else uuid.uuid4()
        if group_id in self._groups:
            raise InvalidArgument(f"a job group with UUID '{group_id}' already exists")
        group = self._groups[group_id] = JobGroup(self.engine, group_id, spec.mode, save=self._save)

        def created(records: list[JobRecord]) -> None:
            group.attach(records)
            self._save(group)  # committed with the members' rows

        try:
            await self.engine.begin_all(
                [(m.domain, m.spec) for m in spec.members],
                flags,
                queue=spec.queue,
                together=spec.mode is GroupMode.ALL_OR_NOTHING,
                path_guard=path_guard,
                on_created=created,
            )
        except BaseException:
            if not group.records:  # nothing begun: no group
                del self._groups[group_id]
            raise
        _log.info(
            "job group began",
            group=str(group_id),
            mode=str(spec.mode),
            jobs=[str(r.uuid) for r in group.records],
        )
        group._check_settled()  # every member may have ended already (a failed start)
        return group

    async def explain(
        self, spec: JobGroupSpec, flags: int = 0, *, path_guard: PathGuard | None = None
    ) -> Explanation:
        """What ``begin(spec, flags)`` would do now, changing nothing
        (``Engine.explain_all``): the group's decision (an independent group's members
        each do as their own rule's decision says)."""
        check_flags("JobGroupBegin", flags)
        return await self.engine.explain_all(
            [(m.domain, m.spec) for m in spec.members],
            flags,
            queue=spec.queue,
            path_guard=path_guard,
        )

    def _save(self, group: JobGroup) -> None:
        if self._state is not None:
            self._state.save(_KEY + str(group.uuid), group.record())

    def lookup(self, group_id: uuid.UUID) -> JobGroup:
        self._forget_gone()
        group = self._groups.get(group_id)
        if group is None:
            raise NoSuchJob(f"no job group with UUID '{group_id}'")
        return group

    def _forget_gone(self) -> None:
        """Drop the oldest groups whose members are all gone from the store (amortised
        O(1): stops at the first group still holding a retained member)."""
        self.engine.store.purge(self.engine.clock.now())
        while self._groups:
            group = next(iter(self._groups.values()))
            if not group.records or any(
                self.engine.store.get(r.uuid) is not None for r in group.records
            ):
                return
            del self._groups[group.uuid]
            if self._state is not None:
                self._state.delete(_KEY + str(group.uuid))

    def _restore(self) -> None:
        """The groups the store kept (after the engine recovered their members): each
        with its retained members, the rules of its mode applied again to the active
        ones (design/scheduling.md "Job groups", "A restart")."""
        if self._state is None:
            return
        saved = sorted(
            (v.get("created", 0.0), k, v)
            for k, v in self._state.load().items()
            if k.startswith(_KEY) and isinstance(v, dict)
        )
        for _, key, value in saved:
            try:
                group_id = uuid.UUID(key[len(_KEY) :])
                mode = GroupMode(value["mode"])
                members = [self.engine.store.get(uuid.UUID(j)) for j in value["jobs"]]
                held = {uuid.UUID(k): dict(v) for k, v in value.get("held", {}).items()}
            except (KeyError, ValueError, TypeError):
                _log.warning("job group record not understood: dropped", key=key)
                self._state.delete(key)
                continue
            records = [r for r in members if r is not None]
            if not records:
                self._state.delete(key)
                continue
            group = JobGroup(
                self.engine, group_id, mode, created=value.get("created"), save=self._save
            )
            group._restoring = True
            group.attach(records, only_active=True)
            self._groups[group_id] = group
            queued = tuple(r.ticket for r in records if r.state is S.QUEUED)
            if mode is GroupMode.ALL_OR_NOTHING and queued:  # admitted together, as before
                for ticket in queued:
                    ticket.together = queued
            for rec in records:  # done when the last process went: held again, as it was
                if rec.uuid in held and rec.state.active and mode is GroupMode.ALL_OR_NOTHING:
                    extra = held[rec.uuid]
                    self.engine.recovered_as[rec.uuid] = Concluded(S.COMPLETED, None, extra)
        if saved:
            _log.info("job groups restored", groups=len(self._groups))


_KEY = "group:"
