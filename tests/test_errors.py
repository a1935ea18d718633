"""jobcore.errors.leaf_error: the one unwrapper of task groups' exception groups."""

from __future__ import annotations

import anyio
import pytest

from jobcore.errors import DriverError, JobError, leaf_error


class Stop(BaseException):
    """Stands for a cancellation travelling beside the real error."""


def test_leaf_error_finds_the_real_error_in_nested_groups() -> None:
    boom = DriverError("boom")
    assert leaf_error(boom) is boom  # not a group: as it is
    assert leaf_error(ExceptionGroup("g", [ExceptionGroup("h", [boom, KeyError()])])) is boom
    # a cancellation-like BaseException beside it is not what went wrong, at any depth
    assert leaf_error(BaseExceptionGroup("g", [Stop(), BaseExceptionGroup("h", [boom])])) is boom
    stop = Stop()
    assert leaf_error(BaseExceptionGroup("g", [stop])) is stop  # only that: it is the leaf


async def _failing_task_group() -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.sleep, 10)

        async def fail() -> None:
            raise JobError("the real one")

        tg.start_soon(fail)


def test_leaf_error_of_a_failed_task_group() -> None:
    with pytest.raises(BaseException) as caught:
        anyio.run(_failing_task_group)
    leaf = leaf_error(caught.value)
    assert isinstance(leaf, JobError) and str(leaf) == "the real one"
