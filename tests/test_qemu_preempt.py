"""Preemption on qemu:///session: a slow backup paused by a higher-priority block pull of
its disk, resumed once the pull ended, and still a correct point-in-time copy."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from qemu_helpers import compare, create, domain_xml, write

import jobcore
from jobcore import JobState
from jobcore.events import EventKind, JobEvent

pytestmark = [pytest.mark.qemu, pytest.mark.anyio]
S = JobState
PULL = (
    "<job type='blockpull'><priority>5</priority>"
    "<policy conflict='preempt'/><disk name='vda'/></job>"
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_pull_preempts_a_slow_backup_of_its_disk(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2")
    write(base, "write -P 0x3c 0 8M")
    top = create(tmp_path / "top.qcow2", backing=base)
    full = tmp_path / "full.qcow2"
    uri = f"qemu:///session?dir={tmp_path / 'run'}&backup_bandwidth=65536"  # a slow backup
    async with jobcore.connect(uri) as conn:
        dom = await conn.create_domain(domain_xml("vm1", {"vda": top}, memory_mib=16))
        with conn.subscribe(domain="vm1") as sub:
            victim = await dom.job_begin(
                "<job type='backup'><domainbackup><disks><disk name='vda' type='file'>"
                f"<target file='{full}'/></disk></disks></domainbackup></job>"
            )
            assert (await dom.job_explain(PULL))["decision"] == "preempt"
            boss = await dom.job_begin(PULL)
            assert boss.state is S.RUNNING and victim.state is S.PAUSED  # QEMU paused it
            assert (await victim.stats())["preempted_by"] == str(boss.uuid)
            with anyio.fail_after(30):
                assert (await boss.wait()).state is S.COMPLETED
            events: list[JobEvent] = []
            with anyio.fail_after(10):
                async for ev in sub:  # until the engine resumed it
                    events.append(ev)
                    if ev.job == victim.uuid and ev.state is S.RUNNING and len(events) > 1:
                        break
            await victim.set_speed(None)  # now let it finish
            with anyio.fail_after(30):
                assert (await victim.wait()).state is S.COMPLETED
            while (rest := sub.get_nowait()) is not None:
                events.append(rest)
        mine = [
            (e.kind, e.state)
            for e in events
            if e.job == victim.uuid and e.kind is not EventKind.PROGRESS
        ]
        assert mine == [
            (EventKind.STATE, S.RUNNING),
            (EventKind.STATE, S.PAUSED),
            (EventKind.PREEMPTED, S.PAUSED),
            (EventKind.STATE, S.RUNNING),
            (EventKind.STATE, S.COMPLETED),
            (EventKind.FINAL, S.COMPLETED),
        ]
        compare(base, full)  # the guest's disk as it was: the pull changed no data
