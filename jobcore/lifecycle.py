"""Job states, verbs, and the tables that govern them.

The tables are data: ``TRANSITIONS`` (which state may follow which), ``VERBS`` (which
user verb each state accepts; a job's type, and its driver, may accept fewer verbs at
all: ``JobTypeInfo.verbs``, ``DriverConnection.job_verbs``) and ``REPORT_TARGET`` (what a
driver report does in each state). The engine's single ``transition()`` consults the
first; ``check_verb()`` the second, with the job's verb set; the engine's report handling
the third. design/tables.md (tables and state diagram) and the property kit are generated
from / checked against the same objects.
"""

from __future__ import annotations

import enum

from jobcore import constants as C
from jobcore.errors import OperationInvalid

TYPE_CHECKING = False  # typing and uuid are not loaded for this (jobctl's fast start)
if TYPE_CHECKING:
    import uuid


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    COMPLETING = "completing"
    ABORTING = "aborting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    #: the job has ended (one of TERMINAL); set on each member below, a plain attribute
    #: (the engine asks it at every step of a job: no property call, no set lookup)
    terminal: bool
    #: the job has not ended
    active: bool


S = JobState
TERMINAL: frozenset[JobState] = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})
for _state in JobState:
    _state.terminal = _state in TERMINAL
    _state.active = _state not in TERMINAL
del _state

STATE_DOC: dict[JobState, str] = {
    S.QUEUED: "waiting for a contested resource (only when the caller asked to queue)",
    S.RUNNING: "doing its work",
    S.PAUSED: "stopped by the user (or by a preemptor, until it ends); `resume` returns it "
    "to running",
    S.READY: "converged, waiting for `complete` (active commit, pull backup)",
    S.STANDBY: "paused while ready; `resume` returns it to ready",
    S.COMPLETING: "`complete` was accepted: pivoting or finishing",
    S.ABORTING: "`abort` was accepted: the hypervisor is cancelling",
    S.COMPLETED: "ended successfully",
    S.FAILED: "ended with an error; `errmsg` says why",
    S.CANCELLED: "ended by `abort`",
}

#: Jobs are created in one of these states.
INITIAL: frozenset[JobState] = frozenset({S.QUEUED, S.RUNNING})

#: from-state -> the states it may move to. Terminal states are absorbing.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset({S.RUNNING, S.FAILED, S.CANCELLED}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.ABORTING, S.COMPLETED, S.FAILED}),
    # the work may end, or converge, while a pause takes effect
    S.PAUSED: frozenset({S.RUNNING, S.STANDBY, S.ABORTING, S.COMPLETED, S.FAILED}),
    S.READY: frozenset({S.STANDBY, S.COMPLETING, S.ABORTING, S.COMPLETED, S.FAILED}),
    S.STANDBY: frozenset({S.READY, S.COMPLETING, S.ABORTING, S.COMPLETED, S.FAILED}),
    # back to ready when the hypervisor refuses the completion
    S.COMPLETING: frozenset({S.COMPLETED, S.FAILED, S.READY}),
    # a cancel can lose the race against the end of the work: the job then completes
    S.ABORTING: frozenset({S.CANCELLED, S.FAILED, S.COMPLETED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


class Verb(enum.StrEnum):
    ABORT = "abort"
    PAUSE = "pause"
    RESUME = "resume"
    COMPLETE = "complete"
    SET_SPEED = "set-speed"


#: every verb: what a job type, and a driver, accepts unless it says otherwise
ALL_VERBS: frozenset[Verb] = frozenset(Verb)

#: verb -> the states that accept it (the job's type may refuse further; see check_verb).
VERBS: dict[Verb, frozenset[JobState]] = {
    Verb.ABORT: frozenset({S.QUEUED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY}),
    Verb.PAUSE: frozenset({S.RUNNING, S.READY}),
    Verb.RESUME: frozenset({S.PAUSED, S.STANDBY}),
    Verb.COMPLETE: frozenset({S.READY, S.STANDBY}),
    Verb.SET_SPEED: frozenset({S.QUEUED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY}),
}

#: What the verb moves the job to, when accepted (abort of a queued job ends it at once).
VERB_TARGET: dict[tuple[Verb, JobState], JobState] = {
    **{(Verb.ABORT, s): S.ABORTING for s in VERBS[Verb.ABORT] if s is not S.QUEUED},
    (Verb.ABORT, S.QUEUED): S.CANCELLED,
    (Verb.PAUSE, S.RUNNING): S.PAUSED,
    (Verb.PAUSE, S.READY): S.STANDBY,
    (Verb.RESUME, S.PAUSED): S.RUNNING,
    (Verb.RESUME, S.STANDBY): S.READY,
    (Verb.COMPLETE, S.READY): S.COMPLETING,
    (Verb.COMPLETE, S.STANDBY): S.COMPLETING,
}


class Report(enum.StrEnum):
    """What a driver tells the engine about a job (``JobReporter``'s methods)."""

    PROGRESS = "progress"
    READY = "ready"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: The states in which the driver has the job: started and not yet ended.
DRIVER_STATES: frozenset[JobState] = frozenset(s for s in JobState if s.active) - {S.QUEUED}

#: (report, state) -> the states the report moves the job through, in order (empty: no
#: state change, e.g. progress). A report in a state not listed makes no sense there (a
#: late or duplicate report, a driver bug): the engine logs it and ignores it.
REPORT_TARGET: dict[tuple[Report, JobState], tuple[JobState, ...]] = {
    **{(Report.PROGRESS, s): () for s in DRIVER_STATES},
    (Report.READY, S.RUNNING): (S.READY,),
    (Report.READY, S.PAUSED): (S.STANDBY,),
    **{(Report.COMPLETED, s): (S.COMPLETED,) for s in DRIVER_STATES},
    **{(Report.FAILED, s): (S.FAILED,) for s in DRIVER_STATES},
    # a cancel the hypervisor did on its own passes through 'aborting'
    **{(Report.CANCELLED, s): (S.ABORTING, S.CANCELLED) for s in VERBS[Verb.ABORT] - {S.QUEUED}},
    (Report.CANCELLED, S.ABORTING): (S.CANCELLED,),
    # the hypervisor dropped a job it was finishing: it has ended, and not as asked
    (Report.CANCELLED, S.COMPLETING): (S.FAILED,),
}

#: JobState -> virDomainJobType for the legacy calls.
LEGACY_JOB_TYPE: dict[JobState, int] = {
    **{s: C.VIR_DOMAIN_JOB_UNBOUNDED for s in JobState if s.active},
    S.COMPLETED: C.VIR_DOMAIN_JOB_COMPLETED,
    S.FAILED: C.VIR_DOMAIN_JOB_FAILED,
    S.CANCELLED: C.VIR_DOMAIN_JOB_CANCELLED,
}


def transition_allowed(old: JobState, new: JobState) -> bool:
    return new in TRANSITIONS[old]


def accepts(state: JobState, verb: Verb, verbs: frozenset[Verb] = ALL_VERBS) -> bool:
    """Whether a job in ``state`` whose type (and driver) accept ``verbs`` takes ``verb``."""
    return verb in verbs and state in VERBS[verb]


def check_verb(
    job: uuid.UUID, state: JobState, verb: Verb, verbs: frozenset[Verb] = ALL_VERBS
) -> JobState:
    """Return the state ``verb`` moves the job to, or raise OperationInvalid. ``verbs``:
    the verbs the job accepts at all (its type's, narrowed by its driver's)."""
    if verb not in verbs:
        raise OperationInvalid(
            f"job '{job}' in state '{state}' cannot accept verb '{verb}': its job type "
            "(on this driver) never does",
            job=job,
            state=str(state),
            verb=str(verb),
        )
    if state not in VERBS[verb]:
        raise OperationInvalid(
            f"job '{job}' in state '{state}' cannot accept verb '{verb}'",
            job=job,
            state=str(state),
            verb=str(verb),
        )
    return VERB_TARGET.get((verb, state), state)


def _check_tables() -> None:
    for verb, states in VERBS.items():
        for state in states:
            target = VERB_TARGET.get((verb, state), state)
            assert target == state or target in TRANSITIONS[state], (verb, state)
    for state in TERMINAL:
        assert not TRANSITIONS[state]
    for (_, state), path in REPORT_TARGET.items():
        assert state in DRIVER_STATES, state
        for a, b in zip((state, *path), path, strict=False):
            assert b in TRANSITIONS[a], (state, path)


_check_tables()
