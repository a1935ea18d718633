"""jobcore.testing's lifecycle and scheduling kit, run against sim on asyncio and trio, on
the memory store and on a durable store with restarts; a driver that cannot recover gets
no restart step."""

from __future__ import annotations

from typing import ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from drivers.sim import SimConnection, SimDriver
from jobcore import drivers as driver_registry
from jobcore.testing import JobLifecycleMachine

KIT_SETTINGS = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
#: a restart opens a store and recovers every job: fewer, longer examples
RESTART_SETTINGS = settings(
    max_examples=15,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class SimOnAsyncio(JobLifecycleMachine):
    URI = "sim:///default?clock=manual"
    BACKEND = "asyncio"


class SimOnTrio(JobLifecycleMachine):
    URI = "sim:///default?clock=manual"
    BACKEND = "trio"


class Counted(JobLifecycleMachine):
    """Counts the restarts its examples made, so a test can say the step ran (or not)."""

    restarts_made: ClassVar[int] = 0

    def teardown(self) -> None:
        type(self).restarts_made += self.restarts
        super().teardown()


class DurableSimOnAsyncio(Counted):
    URI = "sim:///default?clock=manual"
    BACKEND = "asyncio"
    DURABLE = True


class DurableSimOnTrio(Counted):
    URI = "sim:///default?clock=manual"
    BACKEND = "trio"
    DURABLE = True


TestSimOnAsyncio = SimOnAsyncio.TestCase
TestSimOnAsyncio.settings = KIT_SETTINGS
TestSimOnTrio = SimOnTrio.TestCase


class PreemptingSim(JobLifecycleMachine):
    """The kit with its preempt step: preemptors of priority 1000 among the jobs."""

    URI = "sim:///default?clock=manual"
    BACKEND = "asyncio"
    PREEMPT = True
    preemptions: ClassVar[int] = 0

    def teardown(self) -> None:
        type(self).preemptions += sum(len(s.preempted_by) for s in self.seen.values())
        super().teardown()


def test_the_sim_kit_with_preemption() -> None:
    PreemptingSim.preemptions = 0
    # derandomized: a fixed set of examples, so "some step preempted" cannot miss by luck
    run_state_machine_as_test(PreemptingSim, settings=settings(KIT_SETTINGS, derandomize=True))
    assert PreemptingSim.preemptions > 0  # the step preempted jobs, and they were checked


TestSimOnTrio.settings = KIT_SETTINGS


def test_the_sim_kit_on_a_durable_store_restarts_and_recovers() -> None:
    DurableSimOnAsyncio.restarts_made = 0
    run_state_machine_as_test(DurableSimOnAsyncio, settings=RESTART_SETTINGS)
    assert DurableSimOnAsyncio.restarts_made > 0


def test_the_sim_kit_on_a_durable_store_restarts_on_trio() -> None:
    DurableSimOnTrio.restarts_made = 0
    run_state_machine_as_test(DurableSimOnTrio, settings=RESTART_SETTINGS)
    assert DurableSimOnTrio.restarts_made > 0


class ForgetfulConnection(SimConnection):
    """A sim host whose connection cannot re-attach jobs after a restart."""

    recover_job = None  # type: ignore[assignment]


class ForgetfulDriver(SimDriver):
    scheme = "forgetful"
    persistent_state = False
    connection_class = ForgetfulConnection


class ForgetfulEntryPoint:
    name = "forgetful"

    def load(self) -> type[ForgetfulDriver]:
        return ForgetfulDriver


class DurableForgetful(Counted):
    URI = "forgetful:///default?clock=manual"
    BACKEND = "asyncio"
    DURABLE = True


def test_a_driver_that_cannot_recover_gets_no_restart_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(driver_registry, "entry_points", lambda *, group: [ForgetfulEntryPoint()])
    DurableForgetful.restarts_made = 0
    run_state_machine_as_test(
        DurableForgetful,
        settings=settings(
            max_examples=5,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert DurableForgetful.restarts_made == 0
