"""JobInfo: a snapshot of one job, typed and also readable as a mapping; Explanation:
an admission dry run's answer (``dom.job_explain``, ``job.explain``)."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from attrs import fields, frozen

from jobcore.lifecycle import LEGACY_JOB_TYPE, JobState
from jobcore.spec import Decision, JobType


@frozen
class JobInfo(Mapping[str, Any]):
    """What ``job.info()`` and ``JobGetInfo`` return.

    As a mapping, values are plain: UUID, type and state as strings, ``progress`` as a
    percentage (0.0–100.0), times as seconds since the epoch (``None`` until they happen),
    ``time_elapsed`` in milliseconds.
    """

    uuid: uuid.UUID
    type: JobType
    domain: str
    state: JobState
    processed: int
    total: int
    time_elapsed: int
    created: float
    started: float | None
    ended: float | None
    errmsg: str | None
    bandwidth: int | None
    #: the fleet member that owns the job (``jobd --host``; in-process: the hostname)
    host: str = ""
    #: the job is active and its host is not LIVE (a row of another fleet member whose
    #: lease expired, or which stopped or was fenced); always False for a member's own
    host_lost: bool = False

    @property
    def progress(self) -> float:
        if self.total <= 0:
            return 100.0 if self.state is JobState.COMPLETED else 0.0
        return min(100.0, 100.0 * self.processed / self.total)

    def __getitem__(self, key: str) -> Any:
        if key not in _KEYS:
            raise KeyError(key)
        value = getattr(self, key)
        if key in ("uuid", "type", "state"):
            return str(value)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(_KEYS)

    def __len__(self) -> int:
        return len(_KEYS)

    def as_dict(self) -> dict[str, Any]:
        return {k: self[k] for k in _KEYS}


def _mapping_keys() -> tuple[str, ...]:
    """The mapping's keys: the attrs fields, with ``progress`` after ``total``."""
    names = [f.name for f in fields(JobInfo)]
    names.insert(names.index("total") + 1, "progress")
    return tuple(names)


_KEYS = _mapping_keys()


class HostState(enum.StrEnum):
    """A fleet member's state, from its ``hosts`` row (design/fleet.md "Leases")."""

    #: its lease was renewed within its ttl
    LIVE = "live"
    #: it left cleanly (jobd stopped); its jobs may still be active (kept guests)
    STOPPED = "stopped"
    #: its lease is older than its ttl, and it neither left nor was fenced
    LOST = "lost"
    #: an operator fenced it; cleared when it rejoins
    FENCED = "fenced"


@frozen
class HostInfo(Mapping[str, Any]):
    """A fleet member as ``jobctl hosts`` lists it; as a mapping, its state as a string."""

    name: str
    state: HostState
    #: seconds since its last renewal, by the database's clock
    lease_age: float
    lease_ttl: float
    #: its jobs in an active state (queued, running, paused, ready, …)
    active_jobs: int
    #: all its job rows (retained ended ones too)
    jobs: int
    pid: int
    fenced_by: str | None = None
    fence_reason: str | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in _HOST_KEYS:
            raise KeyError(key)
        value = getattr(self, key)
        return str(value) if key == "state" else value

    def __iter__(self) -> Iterator[str]:
        return iter(_HOST_KEYS)

    def __len__(self) -> int:
        return len(_HOST_KEYS)

    def as_dict(self) -> dict[str, Any]:
        return {k: self[k] for k in _HOST_KEYS}


_HOST_KEYS = tuple(f.name for f in fields(HostInfo))


def job_stats(
    info: JobInfo, operation: int, progress_keys: str, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """A job's libvirt-named stats (virDomainGetJobStats keys, ``progress_keys`` naming
    its ``*_total/processed/remaining``) plus its ``extra`` stats, 'uuid' and 'state':
    what ``JobGetStats`` returns, from the engine's record or a fleet member's row."""
    st: dict[str, Any] = {
        "type": LEGACY_JOB_TYPE[info.state],
        "operation": operation,
        "time_elapsed": info.time_elapsed,
        f"{progress_keys}_total": info.total,
        f"{progress_keys}_processed": info.processed,
        f"{progress_keys}_remaining": max(0, info.total - info.processed),
    }
    st.update(extra)
    if info.state.terminal:
        st["success"] = info.state is JobState.COMPLETED
    if info.errmsg is not None:
        st["errmsg"] = info.errmsg
    st["uuid"] = str(info.uuid)
    st["state"] = str(info.state)
    return st


@frozen
class ClaimView:
    """One claim a job takes (or would take): the resource and the mode."""

    resource: str
    mode: str


@frozen
class Blocker:
    """A job in the way: its UUID, the contested resource, and the rule that decides."""

    uuid: uuid.UUID
    resource: str
    rule: str


@frozen
class Explanation(Mapping[str, Any]):
    """What admission would do with a job XML now (``dom.job_explain``), or where a
    queued job stands (``job.explain``); nothing is changed by asking.

    As a mapping: ``decision`` (``admit``, ``queue``, ``conflict`` or ``preempt``),
    ``claims`` (a list of ``{"resource", "mode"}``), ``blockers`` (a list of ``{"uuid",
    "resource", "rule"}``, UUIDs as strings) and ``position`` (a queued job's place in
    its queues, 1 = next; None otherwise)."""

    decision: Decision
    claims: tuple[ClaimView, ...] = ()
    blockers: tuple[Blocker, ...] = ()
    position: int | None = None

    def __getitem__(self, key: str) -> Any:
        if key == "decision":
            return str(self.decision)
        if key == "claims":
            return [{"resource": c.resource, "mode": c.mode} for c in self.claims]
        if key == "blockers":
            return [
                {"uuid": str(b.uuid), "resource": b.resource, "rule": b.rule} for b in self.blockers
            ]
        if key == "position":
            return self.position
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(_EXPLAIN_KEYS)

    def __len__(self) -> int:
        return len(_EXPLAIN_KEYS)

    def as_dict(self) -> dict[str, Any]:
        return {k: self[k] for k in _EXPLAIN_KEYS}


_EXPLAIN_KEYS = ("decision", "claims", "blockers", "position")


# groups

_UUID = uuid.UUID


@frozen
class GroupInfo(Mapping[str, Any]):
    """What ``group.info()``, ``JobGroupGetInfo`` and ``JobGroupWait`` return: the group
    and its members in document order (``jobs[i]`` runs on ``domains[i]``, is in
    ``states[i]``), and its final stats once it ended (sums over the members, counts).
    As a mapping, UUIDs and states are strings and the member tuples are lists."""

    uuid: uuid.UUID
    #: 'all-or-nothing' or 'independent'
    mode: str
    #: jobcore.groups.GroupState, derived from the members' states (GROUP_STATE_TABLE)
    state: str
    jobs: tuple[_UUID, ...]
    domains: tuple[str, ...]
    types: tuple[str, ...]
    states: tuple[str, ...]
    processed: int
    total: int
    completed: int
    failed: int
    cancelled: int
    #: seconds since the epoch; ``ended``: when its last member ended (None until then)
    created: float
    ended: float | None

    def __getitem__(self, key: str) -> Any:
        if key not in _GROUP_KEYS:
            raise KeyError(key)
        value = getattr(self, key)
        if key == "uuid":
            return str(value)
        if key == "jobs":
            return [str(j) for j in value]
        return list(value) if isinstance(value, tuple) else value

    def __iter__(self) -> Iterator[str]:
        return iter(_GROUP_KEYS)

    def __len__(self) -> int:
        return len(_GROUP_KEYS)

    def as_dict(self) -> dict[str, Any]:
        return {k: self[k] for k in _GROUP_KEYS}


_GROUP_KEYS = tuple(f.name for f in fields(GroupInfo))
