"""The lifecycle tables are consistent, and check_verb follows them exactly."""

from __future__ import annotations

import uuid

import pytest

from jobcore.errors import OperationInvalid
from jobcore.lifecycle import (
    INITIAL,
    TERMINAL,
    TRANSITIONS,
    VERB_TARGET,
    VERBS,
    JobState,
    Verb,
    check_verb,
)


def test_terminal_states_are_absorbing() -> None:
    assert TERMINAL == {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}
    for state in TERMINAL:
        assert TRANSITIONS[state] == frozenset()


def test_every_state_is_reachable_and_can_end() -> None:
    reachable = set(INITIAL)
    frontier = list(INITIAL)
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(JobState)
    for state in JobState:
        if state.active:
            assert TRANSITIONS[state] & (TERMINAL | {s for s in JobState if s.active})
            assert JobState.FAILED in TRANSITIONS[state]


@pytest.mark.parametrize("verb", list(Verb))
@pytest.mark.parametrize("state", list(JobState))
def test_check_verb_follows_the_table(verb: Verb, state: JobState) -> None:
    job = uuid.uuid4()
    if state in VERBS[verb]:
        target = check_verb(job, state, verb)
        assert target == VERB_TARGET.get((verb, state), state)
        assert target == state or target in TRANSITIONS[state]
    else:
        with pytest.raises(OperationInvalid) as err:
            check_verb(job, state, verb)
        message = str(err.value)
        assert str(job) in message and f"'{state}'" in message and f"'{verb}'" in message
        assert err.value.job == job and err.value.state == state and err.value.verb == verb
