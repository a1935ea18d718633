"""A driver start that never returns (a hung hypervisor) is bounded by the engine itself
(``Engine.start_timeout``, shielded from the caller's cancellation but not from the
deadline): the job fails with a message naming the bound, the driver is told to cancel,
and a shutdown is no longer held by the start."""

from __future__ import annotations

import time
import uuid

import anyio
import pytest
from engine_helpers import Quiet, gated_sim

from jobcore import JobState
from jobcore.engine import DEFAULT_START_TIMEOUT, Engine
from jobcore.errors import DriverError, InvalidArgument
from jobcore.local import as_local

pytestmark = pytest.mark.anyio

PULL = "<job type='blockpull'><uuid>{u}</uuid><disk name='vda'/></job>"


async def test_a_hung_start_fails_after_the_engine_bound() -> None:
    assert DEFAULT_START_TIMEOUT == 60.0
    async with gated_sim() as (conn, gated, _):
        as_local(conn).engine.start_timeout = 0.3
        dom = await conn.lookup_domain("vm1")
        gated.hold = ("start", "before")  # the driver's start never returns by itself
        job_id = uuid.uuid4()
        t0 = time.monotonic()
        with pytest.raises(DriverError, match=r"did not start job .* within 0\.3 s"):
            await dom.job_begin(PULL.format(u=job_id))
        assert time.monotonic() - t0 < 3
        rec = as_local(conn).engine.store.get(job_id)
        assert rec is not None and rec.state is JobState.FAILED
        assert "within 0.3 s" in (rec.errmsg or "")
        assert gated.calls[-1] == "cancel"  # the driver was told to clean up
        # the disk's chain is free again
        other = await dom.job_begin(PULL.format(u=uuid.uuid4()))
        assert other.state is JobState.RUNNING


async def test_a_cancelled_begin_still_ends_at_the_bound() -> None:
    """The shield keeps the caller's cancellation out of the start, not the deadline."""
    async with gated_sim() as (conn, gated, _):
        as_local(conn).engine.start_timeout = 0.3
        dom = await conn.lookup_domain("vm1")
        gated.hold = ("start", "before")
        job_id = uuid.uuid4()
        with anyio.move_on_after(0.05), pytest.raises(DriverError, match=r"within 0\.3 s"):
            await dom.job_begin(PULL.format(u=job_id))  # the client went away at once
        rec = as_local(conn).engine.store.get(job_id)
        assert rec is not None and rec.state is JobState.FAILED


def test_start_timeout_is_checked() -> None:
    for bad in (0, -1.0, float("nan"), "5"):
        with pytest.raises(InvalidArgument, match="start_timeout"):
            Engine(Quiet(), None, start_timeout=bad)  # type: ignore[arg-type]
