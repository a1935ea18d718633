"""Cross-host migration on sim (design/fleet.md "Cross-host migration"): a migration whose
destination ``sim:///NAME`` names another member of the fleet hands the domain over to
that member's connection of the same URI, through the database; a member that is down
takes it once it is back, and the domain is never on both hosts nor on neither."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest
from fleet_helpers import fleet_member as member
from fleet_helpers import until
from jobd_helpers import Jobd

import jobcore
from jobcore.errors import NoSuchDomain
from jobcore.lifecycle import JobState

pytestmark = pytest.mark.anyio

GUEST = """<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory><devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/shared/{name}/top.qcow2'/>
      <backingStore type='file'><format type='qcow2'/>
        <source file='/shared/{name}/base.qcow2'/><backingStore/></backingStore>
      <target dev='vda' bus='virtio'/></disk>
  </devices></domain>"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def kill(jobd: Jobd) -> None:
    jobd.proc.send_signal(signal.SIGKILL)
    jobd.proc.wait()


def migration(dest: str) -> str:
    return f"<job type='migration'><destination uri='{dest}'/></job>"


async def names(jobd: Jobd) -> set[str]:
    async with jobcore.connect(jobd.uri()) as conn:
        return {d.name for d in await conn.list_domains()}


async def test_a_migration_to_another_member_moves_the_domain_there(
    fleet2: tuple[Jobd, Jobd],
) -> None:
    hv1, hv2 = fleet2
    guest = uuid.uuid4()
    async with jobcore.connect(hv1.uri("rate=0")) as c1:
        dom = await c1.create_domain(GUEST.format(name="mig1", uuid=guest))
        before = await dom.info()
        job = await dom.job_begin(migration("sim:///hv2"))
        final = await job.wait(20)
        assert final.state is JobState.COMPLETED, final.errmsg
        with pytest.raises(NoSuchDomain):
            await c1.lookup_domain("mig1")  # gone from hv1 at once
    async with jobcore.connect(hv2.uri()) as c2:

        async def arrived() -> bool:
            return "mig1" in {d.name for d in await c2.list_domains()}

        await until("mig1 on hv2", arrived)
        moved = await (await c2.lookup_domain("mig1")).info()
        assert (moved.uuid, moved.disks, moved.memory) == (guest, before.disks, before.memory)
        # it is hv2's now: a job on it runs there
        dom2 = await c2.lookup_domain("mig1")
        pull = await dom2.job_begin("<job type='blockpull'><disk name='vda'/></job>")
        assert (await pull.info()).host == "hv2"
    assert "mig1" not in await names(hv1)


async def test_a_member_that_is_down_takes_the_domain_when_it_is_back(
    fleet2: tuple[Jobd, Jobd], tmp_path: Path, pg_url: str
) -> None:
    hv1, hv2 = fleet2
    kill(hv2)
    guest = uuid.uuid4()
    async with jobcore.connect(hv1.uri("rate=0")) as c1:
        dom = await c1.create_domain(GUEST.format(name="mig2", uuid=guest))
        job = await dom.job_begin(migration("sim:///hv2"))  # hv2 is a member, down
        assert (await job.wait(20)).state is JobState.COMPLETED
        assert "mig2" not in {d.name for d in await c1.list_domains()}
    # the hand-over survives hv1's own restart too
    kill(hv1)
    hv1 = member(tmp_path, "hv1", pg_url)
    back = member(tmp_path, "hv2", pg_url)
    try:

        async def arrived() -> bool:
            return "mig2" in await names(back)

        await until("mig2 on hv2 once it is back", arrived)
        async with jobcore.connect(back.uri()) as c2:
            assert (await (await c2.lookup_domain("mig2")).info()).uuid == guest
        assert "mig2" not in await names(hv1)
    finally:
        hv1.stop()
        back.stop()
