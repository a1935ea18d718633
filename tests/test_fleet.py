"""Issue 12's fleet, end to end: three jobd members (hv1, hv2, hv3) on one private
PostgreSQL server, sim drivers, a directory standing for shared storage (storage id
``nfs1`` on every member), jobctl as users run it and the tables read directly to check
what the members say (tests/fleet_helpers.py; design/fleet.md "Tests and benchmarks").

- jobs begun on each member are looked up, shown and aborted through another;
- ``jobctl list --fleet`` is complete from every member, and pages in begin order;
- conflicting jobs on one shared image from two hosts: refused, naming the holder's UUID
  and host; a pair the matrix allows (two backups reading it) admitted;
- kill -9 of a member: the others report it lost, its jobs ``host_lost``, its shared claims
  held (a conflicting job elsewhere still refused, a verb on its job refused naming it);
  restarted, it recovers its jobs, takes back its lease and keeps exactly its claims;
  killed again and fenced through another member: its claims released, its active jobs
  failed with the reason; restarted, it rejoins with a warning.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from fleet_helpers import STORAGE, JobdFleet, Member, wait_until
from jobd_helpers import PULL_VDA

import jobcore
from jobcore.cli.errors import ExitCode

BACKUP_VDA_TO = """<job type='backup'>
  <domainbackup><disks>
    <disk name='vda' type='file'><target file='/b/{tag}-vda.qcow2'/></disk>
  </disks></domainbackup>
</job>"""
#: a backup of vm1's vdb alone (beside a pull of its vda)
BACKUP_VDB_ONLY = """<job type='backup'>
  <domainbackup><disks>
    <disk name='vdb' type='file'><target file='/b/{tag}-vdb.qcow2'/></disk>
    <disk name='vda' backup='no'/>
  </disks></domainbackup>
</job>"""
TERMINAL = ("completed", "failed", "cancelled")
#: a simulated host where vm2's vdb (512 MiB) is backed up in 16 s
FAST = f"rate={32 << 20}"
#: and one where it takes 4 s
FASTER_SECONDS = 4
FASTER = f"rate={(512 << 20) // FASTER_SECONDS}"


def backup(tag: str) -> str:
    return BACKUP_VDA_TO.format(tag=tag)


def shared_chain(fleet: JobdFleet) -> tuple[Path, Path]:
    """A two-layer qcow2 chain on the shared storage (top over base, 1 GiB virtual: a pull
    of it runs for minutes at the members' rate)."""
    base, top = fleet.shared / "base.qcow2", fleet.shared / "top.qcow2"
    for args in (
        ["-f", "qcow2", str(base), "1G"],
        ["-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)],
    ):
        subprocess.run(["qemu-img", "create", "-q", *args], check=True)
    return top, base


def shared_domain(name: str, top: Path, base: Path) -> str:
    """Domain XML whose vda runs on the shared chain."""
    return (
        f"<domain><name>{name}</name><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{top}'/>"
        f"<backingStore type='file'><format type='qcow2'/><source file='{base}'/>"
        "<backingStore/></backingStore><target dev='vda'/></disk></devices></domain>"
    )


def on_shared_storage(fleet: JobdFleet) -> tuple[str, str]:
    """Every member gets a domain ``s-NAME`` on one shared chain; the shared resource
    names of its top and base layers, as every member spells them."""
    from jobcore.fleet import SharedRoot, shared_resource
    from jobcore.scheduler import image_resource

    top, base = shared_chain(fleet)
    for member in fleet:
        member.create_domain(shared_domain(f"s-{member.name}", top, base))
    roots = (SharedRoot(STORAGE, str(fleet.shared)),)
    names = tuple(shared_resource(image_resource(str(p)), roots) for p in (top, base))
    assert all(n is not None and n.startswith(f"image:{STORAGE}:") for n in names), names
    return str(names[0]), str(names[1])


def host_entry(member: Member, name: str) -> dict[str, Any]:
    """``name``'s entry of ``jobctl hosts --json`` through ``member``."""
    hosts = member.json("hosts")
    assert [h["name"] for h in hosts] == sorted(h["name"] for h in hosts), hosts
    found = [h for h in hosts if h["name"] == name]
    assert len(found) == 1, hosts
    return dict(found[0])


def seen_as(member: Member, name: str, state: str) -> dict[str, Any] | None:
    entry = host_entry(member, name)
    return entry if entry["state"] == state else None


def seen_live_once_reachable(member: Member, name: str) -> bool:
    """Whether ``member`` shows ``name`` live; False while its fleet reads still fail
    (its pool reconnecting just after a server restart: design/fleet.md, the soak)."""
    done = member.jobctl("hosts", "--json")
    if done.returncode != 0:
        return False
    return any(h["name"] == name and h["state"] == "live" for h in json.loads(done.stdout))


def ended(member: Member, job: str) -> dict[str, Any] | None:
    info: dict[str, Any] = member.json("info", job)
    return info if info["state"] in TERMINAL else None


def refusal(member: Member, domain: str, xml: str) -> str:
    """The one-line error of a begin that ``member`` refuses as a conflict."""
    path = member.fleet.write(f"refused-{uuid.uuid4()}.xml", xml)
    done = member.jobctl("begin", domain, path)
    assert done.returncode == ExitCode.CONFLICT, (done.returncode, done.stdout, done.stderr)
    return done.stderr


def fleet_list(member: Member, *options: str) -> dict[str, dict[str, Any]]:
    """``jobctl list --fleet --json`` through ``member``, by UUID."""
    listed = member.json("list", "--fleet", *options)
    by_uuid = {j["uuid"]: j for j in listed}
    assert len(by_uuid) == len(listed), listed  # each job once
    return by_uuid


# ---- lookup, info and verbs through another member ----------------------------------------


def test_jobs_of_each_member_are_looked_up_shown_and_aborted_through_another(
    jobd_fleet: JobdFleet,
) -> None:
    members = jobd_fleet.members
    jobs = {m.name: m.begin("vm1", PULL_VDA) for m in members}
    assert jobd_fleet.job_rows() == {jobs[m.name]: (m.name, "running") for m in members}

    async def looked_up(via: Member, job: str) -> tuple[str, str, str]:
        async with jobcore.connect(via.uri()) as conn:
            handle = await conn.lookup_job(job)
            info = await handle.info()
            return str(handle.uuid), info.host, str(info.state)

    for i, owner in enumerate(members):
        job = jobs[owner.name]
        via, third = members[(i + 1) % 3], members[(i + 2) % 3]
        # JobLookupByUUID answered by a member that does not own it
        assert anyio.run(looked_up, via, job) == (job, owner.name, "running")
        info = via.json("info", job)
        own = owner.json("info", job)
        for key in ("uuid", "type", "domain", "state", "host", "created", "started"):
            assert info[key] == own[key], (key, info, own)
        assert info["host"] == owner.name and info["host_lost"] is False
        assert f"Host:          {owner.name}" in via.ok("info", job)
        assert job in via.ok("dumpxml", job)
        # the verb reaches the owner, which runs it; everyone sees the end
        assert via.ok("abort", job) == f"{job}: abort requested\n"
        final = wait_until(partial(ended, third, job), f"{job} ended, as {third.name} sees it")
        assert final["state"] == "cancelled" and final["host"] == owner.name
        assert owner.json("info", job)["state"] == "cancelled"
    assert set(jobd_fleet.job_rows().values()) == {(m.name, "cancelled") for m in members}
    # a UUID no host has is unknown everywhere
    nobody = str(uuid.uuid4())
    for member in members:
        assert member.jobctl("info", nobody).returncode == ExitCode.NOT_FOUND


def test_list_fleet_is_complete_from_every_member(jobd_fleet: JobdFleet) -> None:
    members = jobd_fleet.members
    for member in members:
        member.begin("vm1", PULL_VDA)
        member.begin("vm2", PULL_VDA)
        done = member.begin("vm1", BACKUP_VDB_ONLY.format(tag=member.name))
        member.ok("abort", done)
        wait_until(partial(ended, member, done), f"{done} ended")
    rows = jobd_fleet.job_rows()
    assert len(rows) == 9 and {h for h, _ in rows.values()} == {"hv1", "hv2", "hv3"}
    active = {u: h for u, (h, s) in rows.items() if s not in TERMINAL}
    assert len(active) == 6
    for member in members:
        # every job of every host, with its host and state, none lost
        listed = fleet_list(member, "--all")
        assert {u: (j["host"], j["state"]) for u, j in listed.items()} == rows
        assert all(j["host_lost"] is False for j in listed.values())
        # without --all: the active ones
        assert {u: j["host"] for u, j in fleet_list(member).items()} == active
        # its own `list` stays its own
        own = member.json("list")
        assert {j["uuid"] for j in own} == {u for u, h in active.items() if h == member.name}
        assert {j["host"] for j in own} == {member.name}
        assert member.ok("list", "--fleet").splitlines()[0].split()[:3] == [
            "UUID",
            "Domain",
            "Host",
        ]

    async def paged(via: Member) -> list[tuple[str, str]]:
        """Every job of the fleet through list_fleet_jobs, two at a time."""
        found: list[tuple[str, str]] = []
        async with jobcore.connect(via.uri()) as conn:
            cursor: int | None = -1
            while cursor is not None:
                page, cursor = await conn.list_fleet_jobs(cursor=cursor, limit=2)
                assert len(page) <= 2
                found += [(str(i.uuid), i.host) for i in page]
        return found

    in_begin_order = [(u, h) for u, h in jobd_fleet.sql("SELECT uuid, host FROM jobs ORDER BY seq")]
    for member in members:
        assert anyio.run(paged, member) == in_begin_order


# ---- shared-storage claims ------------------------------------------------------------------


def test_conflicting_jobs_on_a_shared_image_from_two_hosts(jobd_fleet: JobdFleet) -> None:
    hv1, hv2, hv3 = jobd_fleet.members
    top, base = on_shared_storage(jobd_fleet)
    pull = hv1.begin("s-hv1", PULL_VDA)  # rewrites the top layer: chain on it
    held = jobd_fleet.claims()
    assert (top, "chain", pull, "hv1") in held and {h for *_, h in held} == {"hv1"}
    for member, xml in ((hv2, backup("hv2")), (hv3, PULL_VDA)):
        said = refusal(member, f"s-{member.name}", xml)
        assert f"job '{pull}' on host 'hv1'" in said and top in said, said
        assert said.startswith("jobctl: error: job '"), said
    # nothing of the refused jobs was written, nor claimed
    assert set(jobd_fleet.job_rows()) == {pull}
    assert jobd_fleet.claims() == held
    # the holder ends (aborted through another member): its claims go with it
    hv3.ok("abort", pull)
    assert wait_until(partial(ended, hv2, pull), "the pull ended")["state"] == "cancelled"
    assert jobd_fleet.claims() == set()
    # two backups read the image at once from two hosts: the matrix allows it
    first = hv2.begin("s-hv2", backup("hv2"))
    second = hv3.begin("s-hv3", backup("hv3"))
    reading = {(r, h) for r, m, _, h in jobd_fleet.claims() if m == "read"}
    assert {(top, "hv2"), (top, "hv3"), (base, "hv2"), (base, "hv3")} <= reading
    assert jobd_fleet.conflicting_holders() == []
    said = refusal(hv1, "s-hv1", PULL_VDA)
    assert any(f"job '{j}' on host '{h}'" in said for j, h in ((first, "hv2"), (second, "hv3")))
    for job in (first, second):
        hv1.ok("abort", job)
    assert jobd_fleet.orphan_claims() == [] and jobd_fleet.conflicting_holders() == []


# ---- host loss, return and fence ----------------------------------------------------------


def test_a_killed_member_is_lost_recovers_and_once_fenced_releases_everything(
    jobd_fleet: JobdFleet,
) -> None:
    hv1, hv2, hv3 = jobd_fleet.members
    top, _ = on_shared_storage(jobd_fleet)
    local = hv3.begin("vm1", PULL_VDA)  # no shared claim
    shared = hv3.begin("s-hv3", PULL_VDA)  # chain on the shared top
    held = jobd_fleet.claims("hv3")
    assert held and {j for _, _, j, _ in held} == {shared}
    # hv1 follows hv3's job: a paused and resumed (through hv2) shows the stream is on
    watching = hv1.events("--job", local, "--no-progress")
    try:
        # jobctl events says nothing when its subscription is on: a pause made before
        # that is not shown, so pause (and resume) until the stream shows one
        for _ in range(12):
            hv2.ok("pause", local)
            try:
                paused = watching.next(lambda e: e["state"] == "paused", timeout=5)
                break
            except AssertionError:
                hv2.ok("resume", local)
        else:
            raise AssertionError("hv1's stream never showed the job paused")
        assert paused["uuid"] == local
        hv2.ok("resume", local)
        watching.next(lambda e: e["state"] == "running")
        before = hv3.json("info", local)
        # and one that ends on its own, seconds from now (another simulated host, faster)
        quick = hv3.begin(
            "vm2", BACKUP_VDB_ONLY.format(tag="quick"), uri=hv3.uri(FAST, sim_host="fast")
        )

        hv3.kill()
        for member in (hv1, hv2):
            lost = wait_until(partial(seen_as, member, "hv3", "lost"), f"{member} sees hv3 lost")
            active = [
                u
                for u, (h, st) in jobd_fleet.job_rows().items()
                if h == "hv3" and st not in TERMINAL
            ]
            assert {local, shared} <= set(active) <= {local, shared, quick}
            assert lost["active_jobs"] == len(active) and lost["lease_age"] >= lost["lease_ttl"], (
                lost
            )
            assert seen_as(member, member.name, "live") is not None
        event = watching.next(lambda e: e["kind"] == "host-lost")
        assert (event["uuid"], event["state"]) == (local, "running"), event
        for job in (local, shared):
            info = hv1.json("info", job)
            assert (info["state"], info["host"], info["host_lost"]) == ("running", "hv3", True)
        listed = fleet_list(hv2)
        assert listed[local]["host_lost"] is True and listed[shared]["host_lost"] is True
        assert {j["host_lost"] for j in listed.values() if j["host"] != "hv3"} <= {False}
        table = {line.split()[0]: line.split() for line in hv2.ok("list", "--fleet").splitlines()}
        assert "LOST" in table[local] and "LOST" in table[shared], table
        # the host may still be writing: its claims stay, a conflicting job elsewhere is refused
        assert jobd_fleet.claims("hv3") == held
        said = refusal(hv1, "s-hv1", backup("hv1"))
        assert f"job '{shared}' on host 'hv3'" in said and top in said, said
        # a verb on its job cannot reach it: refused, saying what to do
        refused = hv2.jobctl("abort", local)
        assert refused.returncode == ExitCode.ERROR, refused.stderr
        assert "which is lost" in refused.stderr and "jobctl host fence hv3" in refused.stderr

        # back: it recovers its jobs (they ran on while it was away), takes back its lease
        hv3.start()
        for member in (hv1, hv2):
            wait_until(partial(seen_as, member, "hv3", "live"), f"{member} sees hv3 back")
        again = hv1.json("info", local)
        assert (again["state"], again["host_lost"]) == ("running", False), again
        mine = hv3.json("info", local)  # its owner's progress: it ran on while hv3 was away
        assert mine["processed"] > before["processed"] and mine["started"] == before["started"]
        assert hv3.json("info", shared)["state"] == "running"
        assert jobd_fleet.claims("hv3") == held and jobd_fleet.orphan_claims() == []
        assert refusal(hv2, "s-hv2", backup("hv2"))  # still held by the recovered job
        # the quick one ends normally, whether its end fell in the outage or after
        assert wait_until(partial(ended, hv2, quick), "quick ended")["state"] == "completed"
        hv1.ok("abort", local)  # a verb on a recovered job, through another member
        assert wait_until(partial(ended, hv2, local), "local ended")["state"] == "cancelled"
        # hv1's stream followed hv3's job across hv3's restart to its end
        assert watching.next(lambda e: e["state"] == "cancelled")["uuid"] == local
    finally:
        watching.close()

    # lost again, and fenced by an operator through another member
    hv3.kill()
    wait_until(partial(seen_as, hv2, "hv3", "lost"), "hv2 sees hv3 lost again")
    reason = "its storage path was cut; node powered off"
    said = hv2.json("host", "fence", "hv3", "--reason", reason)
    fenced = said["host"]
    assert said["jobs_failed"] == 1, said  # the shared pull (the local one was aborted)
    assert (fenced["name"], fenced["state"], fenced["fenced_by"], fenced["fence_reason"]) == (
        "hv3",
        "fenced",
        "hv2",
        reason,
    )
    assert jobd_fleet.claims("hv3") == set()
    failed = hv1.json("info", shared)
    assert failed["state"] == "failed", failed
    assert failed["errmsg"] == f"host 'hv3' was fenced by 'hv2': {reason}"
    assert failed["host_lost"] is False  # ended: nothing of it is active any more
    assert jobd_fleet.job_rows()[shared] == ("hv3", "failed")
    assert seen_as(hv1, "hv3", "fenced") is not None
    # its claims released: the job it blocked is admitted now
    admitted = hv1.begin("s-hv1", backup("hv1"))
    assert {(r, m) for r, m, j, _ in jobd_fleet.claims() if j == admitted} >= {(top, "read")}

    # restarted, it rejoins: live, a warning logged, its fenced job stays failed
    hv3.start()
    wait_until(partial(seen_as, hv1, "hv3", "live"), "hv1 sees hv3 rejoin")
    warnings = [e for e in _log_events(hv3) if e.get("level") == "warning"]
    assert any("fenced" in json.dumps(e) for e in warnings), hv3.log()
    assert hv3.json("info", shared)["errmsg"] == f"host 'hv3' was fenced by 'hv2': {reason}"
    row = jobd_fleet.host_rows()["hv3"]
    assert row["fenced"] is False and row["pid"] == hv3.pid
    assert jobd_fleet.orphan_claims() == [] and jobd_fleet.conflicting_holders() == []
    hv1.ok("abort", admitted)


def test_a_frozen_member_fenced_meanwhile_writes_nothing_once_it_thaws(
    jobd_fleet: JobdFleet,
) -> None:
    """Split brain: a member that stood still (SIGSTOP) past its lease is fenced by an
    operator; when it goes on, it must not write over the fence, and it stops."""
    hv1, hv2, hv3 = jobd_fleet.members
    top, _ = on_shared_storage(jobd_fleet)
    shared = hv3.begin("s-hv3", PULL_VDA)
    # this one's end falls while hv3 stands still: on thawing it has a completion to write
    quick = hv3.begin("vm2", BACKUP_VDB_ONLY.format(tag="q"), uri=hv3.uri(FASTER, sim_host="f"))
    hv3.freeze()
    wait_until(partial(seen_as, hv1, "hv3", "lost"), "hv1 sees hv3 lost")
    reason = "hung: fenced from its PDU"
    said = hv1.json("host", "fence", "hv3", "--reason", reason)
    assert said["host"]["state"] == "fenced" and said["jobs_failed"] == 2, said
    fenced_rows = jobd_fleet.sql("SELECT uuid, state, errmsg, ended FROM jobs WHERE host = 'hv3'")
    message = f"host 'hv3' was fenced by 'hv1': {reason}"
    assert {(u, st, e) for u, st, e, _ in fenced_rows} == {
        (shared, "failed", message),
        (quick, "failed", message),
    }
    admitted = hv2.begin("s-hv2", backup("hv2"))  # the fenced claims are free
    time.sleep(FASTER_SECONDS)  # make sure quick's end has passed by hv3's clock

    hv3.thaw()
    status = wait_until(hv3.proc.poll, "hv3 stopped once it saw its fence")
    assert status == 1, hv3.log()
    assert any("fenced" in json.dumps(e) for e in _log_events(hv3)), hv3.log()
    # nothing it did after the fence landed: the rows are the fence's, its claims gone
    after = jobd_fleet.sql("SELECT uuid, state, errmsg, ended FROM jobs WHERE host = 'hv3'")
    assert sorted(after) == sorted(fenced_rows)
    assert jobd_fleet.claims("hv3") == set()
    assert jobd_fleet.conflicting_holders() == [] and jobd_fleet.orphan_claims() == []
    assert (top, "read", admitted, "hv2") in jobd_fleet.claims()
    # restarted, it rejoins (its fenced jobs stay failed)
    hv3.start()
    wait_until(partial(seen_as, hv2, "hv3", "live"), "hv2 sees hv3 rejoin")
    assert hv3.json("info", quick)["errmsg"] == message
    hv1.ok("abort", admitted)


def test_fence_refuses_a_live_host_itself_and_a_stranger(jobd_fleet: JobdFleet) -> None:
    hv1, hv2, _ = jobd_fleet.members
    live = hv1.jobctl("host", "fence", "hv2", "--reason", "test")
    assert live.returncode == ExitCode.ERROR and "--force" in live.stderr, live.stderr
    itself = hv1.jobctl("host", "fence", "hv1")
    assert itself.returncode != 0 and "hv1" in itself.stderr, itself.stderr
    stranger = hv1.jobctl("host", "fence", "hv9")
    assert stranger.returncode != 0 and "hv9" in stranger.stderr, stranger.stderr
    assert {h: r["fenced"] for h, r in jobd_fleet.host_rows().items()} == {
        "hv1": False,
        "hv2": False,
        "hv3": False,
    }
    assert all(seen_as(hv2, m.name, "live") for m in jobd_fleet)


def _log_events(member: Member) -> list[dict[str, Any]]:
    """This run's log as JSON events (jobd logs JSON lines when not on a terminal)."""
    events = []
    for line in member.log().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def test_after_a_postgresql_restart_members_renew_and_forward_again(
    jobd_fleet: JobdFleet,
) -> None:
    hv1, hv2, hv3 = jobd_fleet.members
    running = hv1.begin("vm1", PULL_VDA)
    jobd_fleet.stop_pg()
    jobd_fleet.start_pg()
    for member in jobd_fleet:  # each renews its lease again (and sees the others do)
        for other in jobd_fleet:
            wait_until(
                partial(seen_live_once_reachable, member, other.name), f"{member} sees {other}"
            )
    assert hv2.json("info", running)["state"] == "running"
    # a verb still reaches the owner through the database, and new jobs are written
    hv3.ok("abort", running)
    assert wait_until(partial(ended, hv2, running), "aborted")["state"] == "cancelled"
    again = {m.name: m.begin("vm2", PULL_VDA) for m in jobd_fleet}
    assert {u: r for u, r in jobd_fleet.job_rows().items() if u != running} == {
        u: (h, "running") for h, u in again.items()
    }
    for member in jobd_fleet:
        assert member.running()
