"""jobcore.testing's lifecycle and scheduling kit, run against sim on asyncio and trio."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from jobcore.testing import JobLifecycleMachine

KIT_SETTINGS = settings(
    max_examples=30,
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


TestSimOnAsyncio = SimOnAsyncio.TestCase
TestSimOnAsyncio.settings = KIT_SETTINGS
TestSimOnTrio = SimOnTrio.TestCase
TestSimOnTrio.settings = KIT_SETTINGS
