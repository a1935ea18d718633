"""Issue 10's acceptance soak: jobd killed with SIGKILL at random moments, cycle after
cycle, with sim and real QEMU jobs on one jobd (its run dir and default SQLite store in
tmp_path), and what must hold after every restart (design/store.md, "The kill soak").

Each cycle kills jobd at a random moment of one scenario: a ``JobBegin`` sent and its reply
not read; a throttled qemu push backup mid-copy; an active commit reaching ready and being
pivoted; a pull backup's export being read over NBD; a throttled same-host qemu migration;
or sim jobs alone. Long sim jobs of every type (push and pull backup, pull, active commit,
migration) run on wall time across the cycles. After each restart on the same run dir:

- every begun job is found by UUID, in a state its last known state can lead to without
  a failure (a running push backup is running or completed, never lost or failed), sim
  progress never goes back; an in-flight begin left a whole job or none (no claim held);
- the guests still run (their pid is alive, jobd runs jobs on them);
- across all incarnations each job has exactly one FINAL event: a watcher subscribes on
  every jobd and resumes by sequence number, and no two events of a job share a number
  with different states;
- the data: completed push backups compare equal to their source, the commit's base to
  the chain it replaced, the pull export reads the source's pattern;
- in the end no QEMU of this test runs.

Knobs: ``JOBCORE_SOAK_CYCLES`` (default 20), ``JOBCORE_SOAK_SEED`` (default random; every
failure message names it, so ``JOBCORE_SOAK_SEED=N make test`` replays the moments)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jobd_helpers import Jobd, RawClient, read_msg
from qemu_helpers import alive, create, domain_xml, kill_and_reap, run, write

from jobcore.events import EventKind, JobEvent
from jobcore.info import JobInfo
from jobcore.lifecycle import JobState
from jobcore.methods import Method
from jobcore.protocol import JobPage, JobRef, MsgType, decode_event, decode_result

pytestmark = pytest.mark.qemu

MiB = 1 << 20
S = JobState
CYCLES = int(os.environ.get("JOBCORE_SOAK_CYCLES", "20"))
SEED = int(os.environ.get("JOBCORE_SOAK_SEED") or random.SystemRandom().randrange(1 << 32))
SIM_RATE = 24 * MiB  # a 512 MiB sim backup runs ~21 s, a 1 GiB pull ~43 s
PUSH_BANDWIDTH = 512 * 1024  # the qemu push backup of 4 MiB: ~2 s (sped up after a restart)
DATA = "write -P 0x5a 0 3M"  # d1's vda: 3 MiB of pattern, 1 MiB more of another below
DATA2 = "write -P 0x3c 3M 1M"

#: where each state may go while jobd is away, with no verb and no failure
LATER: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset({S.QUEUED, S.RUNNING, S.READY, S.COMPLETING, S.COMPLETED}),
    S.RUNNING: frozenset({S.RUNNING, S.READY, S.COMPLETING, S.COMPLETED}),
    S.READY: frozenset({S.READY}),
    S.COMPLETING: frozenset({S.COMPLETING, S.COMPLETED}),
    S.ABORTING: frozenset({S.ABORTING, S.CANCELLED, S.COMPLETED}),
    S.PAUSED: frozenset({S.PAUSED}),
}


class CallFailed(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


class Client:
    """Calls of the method table over a RawClient, their results decoded."""

    def __init__(self, sock: Path, uri: str) -> None:
        self.raw = RawClient.ready(sock, uri, timeout=60)

    def call(self, method: Method, *args: object) -> Any:
        wire = [a.bytes if isinstance(a, uuid.UUID) else a for a in args]
        reply = self.raw.call(method.value.name, *wire)
        if reply[0] == MsgType.ERROR:
            raise CallFailed(reply[2], reply[3])
        return decode_result(method, reply[2])

    def begin(self, domain: str, xml: str) -> JobRef:
        ref: JobRef = self.call(Method.JOB_BEGIN, domain, xml, 0)
        return ref

    def info(self, job: uuid.UUID) -> JobInfo:
        info: JobInfo = self.call(Method.JOB_INFO, job)
        return info

    def wait(self, job: uuid.UUID, timeout: float = 60) -> JobInfo:
        info: JobInfo = self.call(Method.JOB_WAIT, job, timeout)
        return info

    def jobs(self, domain: str) -> list[JobRef]:
        page: JobPage = self.call(Method.LIST_JOBS_PAGE, domain, -1, 1000)
        assert page.cursor is None
        return list(page.refs)

    def close(self) -> None:
        self.raw.close()


class Watcher:
    """One subscription (STATE and FINAL events of every job) on one jobd incarnation,
    read by a thread into the soak's shared list; ``resume`` asks for the catch-up of
    every job from the last numbered event seen of it."""

    def __init__(self, sock: Path, uri: str, seen: list[tuple[int, JobEvent]], n: int) -> None:
        self.raw = RawClient.ready(sock, uri, timeout=60)
        self.sub_id = self.raw.request("subscribe", None, None, None, ["state", "final"], 65536)
        while True:
            msg = self.raw.recv()
            if msg[0] in (MsgType.REPLY, MsgType.ERROR) and msg[1] == self.sub_id:
                assert msg[0] == MsgType.REPLY, msg
                break
            if msg[0] == MsgType.EVENT:
                seen.append((n, decode_event(msg[2])))
        self.raw.sock.settimeout(None)
        self._seen, self._n = seen, n
        self._ids = 1_000_000
        #: error replies jobd sent (to a resume): none is expected
        self.errors: list[list[Any]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, AssertionError, ValueError):
            while True:
                msg = read_msg(self.raw.sock)
                if msg[0] == MsgType.EVENT:
                    self._seen.append((self._n, decode_event(msg[2])))
                elif msg[0] == MsgType.ERROR:
                    self.errors.append(msg)
                elif msg[0] == MsgType.SUB_END:
                    raise AssertionError(f"subscription ended: {msg}")

    def resume(self, last: dict[uuid.UUID, int]) -> None:
        pairs = [[job.bytes, seq] for job, seq in last.items()]
        for i in range(0, len(pairs), 128):
            self._ids += 1
            self.raw.send([MsgType.REQUEST, self._ids, "resume", [self.sub_id, pairs[i : i + 128]]])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.raw.sock.shutdown(2)
        self.raw.close()
        self.thread.join(5)


class Soak:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.rng = random.Random(SEED)
        self.run_dir, self.qdir = tmp / "run", tmp / "qemu"
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.sim = {h: f"sim:///{h}?rate={SIM_RATE}" for h in ("main", "side", "mig", "begin")}
        self.qemu = f"qemu:///session?dir={self.qdir}&backup_bandwidth={PUSH_BANDWIDTH}"
        self.daemon: Jobd | None = None
        self.incarnation = 0
        self.clients: dict[str, Client] = {}
        self.watchers: dict[str, Watcher] = {}
        self.events: list[tuple[int, JobEvent]] = []
        #: every job whose UUID is known: its URI key, and its last state seen
        self.jobs: dict[uuid.UUID, tuple[str, JobInfo]] = {}
        #: in-flight begins whose driver start was cut short: failed, with the reason
        self.failed_ok: set[uuid.UUID] = set()
        self.push_targets: list[tuple[uuid.UUID, Path]] = []
        #: qemu domains beside d1 (a commit's own), destroyed by their scenario
        self.extra_guests: list[str] = []
        #: jobs with a verb in flight at the kill: the states allowed after the restart
        self.in_flight: dict[uuid.UUID, frozenset[JobState]] = {}
        self.cycle = 0
        #: (scenario, job type, state before -> after) of the jobs active at each kill
        self.outcomes: Counter[tuple[str, str, str]] = Counter()
        self.scenario = "setup"

    # ---- jobd -----------------------------------------------------------------------------

    def where(self) -> str:
        return f"seed {SEED} (JOBCORE_SOAK_SEED={SEED}), cycle {self.cycle}, {self.scenario}"

    def check(self, cond: object, what: str) -> None:
        if not cond:
            raise AssertionError(f"{what} [{self.where()}; logs in {self.logs}]")

    def start(self) -> None:
        self.incarnation += 1
        self.daemon = Jobd(
            self.run_dir,
            "--allow-uri",
            f"qemu:///session?dir={self.qdir}",
            "--allow-uri",
            "sim:///*",
        )
        self.daemon.wait_ready(30)
        uris = {**self.sim, "qemu": self.qemu}
        self.clients = {k: Client(self.daemon.sock, u) for k, u in uris.items()}
        last: dict[uuid.UUID, int] = {}
        for _, ev in list(self.events):
            last[ev.job] = max(last.get(ev.job, 0), ev.seq)
        for job in self.jobs:
            last.setdefault(job, 0)
        self.watchers = {}
        for key, u in uris.items():
            w = Watcher(self.daemon.sock, u, self.events, self.incarnation)
            w.resume({j: s for j, s in last.items() if j in self.jobs and self.jobs[j][0] == key})
            self.watchers[key] = w

    def kill(self) -> None:
        assert self.daemon is not None
        self.daemon.proc.send_signal(signal.SIGKILL)
        self.daemon.proc.wait(10)
        self.daemon.stop()
        self._disconnect()
        (self.logs / f"{self.incarnation:02d}.log").write_bytes(self.daemon.log_path.read_bytes())

    def _disconnect(self) -> None:
        for c in self.clients.values():
            c.close()
        for w in self.watchers.values():
            w.close()
            self.check(not w.errors, f"jobd refused a resume: {w.errors}")
        self.clients, self.watchers = {}, {}

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.proc.poll() is None:
            self._disconnect()
            self.check(self.daemon.stop() == 0, f"jobd did not stop cleanly: {self.daemon.log()}")

    # ---- jobs -----------------------------------------------------------------------------

    def c(self, key: str) -> Client:
        return self.clients[key]

    def begin(self, key: str, domain: str, xml: str) -> uuid.UUID:
        ref = self.c(key).begin(domain, xml)
        self.jobs[ref.uuid] = (key, self.c(key).info(ref.uuid))
        return ref.uuid

    def info(self, job: uuid.UUID) -> JobInfo:
        key, _ = self.jobs[job]
        info = self.c(key).info(job)
        self.jobs[job] = (key, info)
        return info

    def until(self, job: uuid.UUID, states: set[JobState], within: float = 30) -> JobInfo:
        deadline = time.monotonic() + within
        while True:
            info = self.info(job)
            if info.state in states:
                return info
            self.check(
                info.state not in (S.FAILED, S.CANCELLED) and time.monotonic() < deadline,
                f"job {job} is {info.state} ({info.errmsg}), not {states}",
            )
            time.sleep(0.02)

    def finish(self, job: uuid.UUID, verb: Method | None = None) -> JobInfo:
        """Lift the job's limit (or send ``verb``) and wait for its end: completed."""
        key, _ = self.jobs[job]
        if verb is not None:
            self.c(key).call(verb, job)
        elif self.info(job).state.active:
            with contextlib.suppress(CallFailed):  # it may end meanwhile
                self.c(key).call(Method.JOB_SET_SPEED, job, 0)
        info = self.c(key).wait(job, 60)
        self.jobs[job] = (key, info)
        self.check(info.state is S.COMPLETED, f"job {job} ended {info.state}: {info.errmsg}")
        return info

    # ---- after each restart ---------------------------------------------------------------

    def verify(self) -> None:
        """Every known job is there, where its last known state could lead."""
        for job, (key, before) in list(self.jobs.items()):
            try:
                now = self.c(key).info(job)
            except CallFailed as exc:
                self.check(False, f"job {job} ({before.type}, was {before.state}) lost: {exc}")
                raise
            if before.state.terminal:
                self.check(
                    (now.state, now.errmsg, now.processed) ==
                    (before.state, before.errmsg, before.processed),
                    f"ended job {job} changed: {before} -> {now}",
                )  # fmt: skip
            elif job in self.failed_ok and now.state is S.FAILED:
                pass
            else:
                allowed = self.in_flight.pop(job, LATER[before.state])
                self.check(
                    now.state in allowed,
                    f"job {job} ({now.type} on {key}) was {before.state}, now {now.state}"
                    f" ({now.errmsg})",
                )
                if key != "qemu":  # sim progress is a function of wall time
                    self.check(
                        now.processed >= before.processed or now.state.terminal,
                        f"sim job {job} went back: {before.processed} -> {now.processed}",
                    )
            if not before.state.terminal:
                kind = f"{'qemu' if key == 'qemu' else 'sim'} {now.type}"
                self.outcomes[(self.scenario, kind, f"{before.state}->{now.state}")] += 1
            self.jobs[job] = (key, now)

    def guests(self, names: list[str]) -> None:
        for name in names:
            pids = [int(p.read_text()) for p in self.qdir.glob(f"{name}.*.pid")]
            self.check(any(alive(p) for p in pids), f"guest {name} is gone ({pids})")
            dom = self.c("qemu").call(Method.DOMAIN_INFO, name)
            self.check(dom.name == name, f"domain {name}: {dom}")

    def check_events(self, complete: bool) -> None:
        """No two events of a job with one number and different states; at most one FINAL
        number per job; with ``complete``, every ended job has had its FINAL event."""
        by_seq: dict[tuple[uuid.UUID, int], tuple[EventKind, JobState, int]] = {}
        finals: dict[uuid.UUID, set[int]] = {}
        for n, ev in list(self.events):
            if ev.kind is EventKind.FINAL:
                finals.setdefault(ev.job, set()).add(ev.seq)
            key = (ev.job, ev.seq)
            if ev.kind is EventKind.STATE and key in by_seq and by_seq[key][0] is EventKind.FINAL:
                continue  # a catch-up STATE of a later number never equals a FINAL one
            old = by_seq.setdefault(key, (ev.kind, ev.state, n))
            self.check(
                old[1] is ev.state,
                f"job {ev.job}: event {ev.seq} was {old[1]} (jobd {old[2]}), then {ev.state}"
                f" (jobd {n}, {ev.kind})",
            )
        for job, seqs in finals.items():
            self.check(len(seqs) == 1, f"job {job} had FINAL events numbered {sorted(seqs)}")
        if complete:
            for job, (_, info) in self.jobs.items():
                if info.state.terminal:
                    self.check(job in finals, f"ended job {job} ({info.state}): no FINAL event")
                    fin = [
                        ev for _, ev in self.events if ev.job == job and ev.kind is EventKind.FINAL
                    ]
                    self.check(fin[0].state is info.state, f"job {job}: FINAL {fin[0]} vs {info}")

    def restart(self) -> None:
        self.kill()
        for name in self.live_guests():
            pids = [int(p.read_text()) for p in self.qdir.glob(f"{name}.*.pid")]
            self.check(any(alive(p) for p in pids), f"guest {name} died with jobd")
        self.start()
        self.verify()
        self.guests(self.live_guests())
        self.check_events(complete=False)

    def live_guests(self) -> list[str]:
        return ["d1", *self.extra_guests]


def _qemu_of(tmp: Path) -> set[int]:
    """Every qemu-system process whose command line names this test's directory."""
    found = set()
    mark = str(tmp).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd.split(b"\0", 1)[0] and mark in cmd and alive(int(entry.name)):
            found.add(int(entry.name))
    return found


# ---- the background sim jobs ---------------------------------------------------------------

BACKUP = (
    "<job type='backup'><domainbackup><disks><disk name='vdb' type='file'>"
    "<target file='/b/{tag}.qcow2'/></disk><disk name='vda' backup='no'/></disks>"
    "</domainbackup></job>"
)
SIM_PULL_BACKUP = (
    "<job type='backup'><domainbackup mode='pull'><server transport='unix' socket='/s/{tag}'/>"
    "<disks><disk name='vdb' type='file'><scratch file='/s/{tag}.qcow2'/></disk>"
    "<disk name='vda' backup='no'/></disks></domainbackup></job>"
)
BLOCKPULL = "<job type='blockpull'><disk name='vda'/></job>"
COMMIT = "<job type='blockcommit'><disk name='vda'/></job>"
MIGRATE = "<job type='migration'><destination uri='sim:///away{tag}'/><live/></job>"


class SimLoad:
    """Long sim jobs of every type on wall time, begun again when one ends; those that
    converge (a pull backup, an active commit) are ended with their verb a few cycles
    after they get ready."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.slots: dict[tuple[str, str], uuid.UUID | None] = {
            ("main", "vm1"): None,  # push backup of vdb
            ("main", "vm2"): None,  # active commit of vda
            ("side", "vm1"): None,  # blockpull of vda
            ("side", "vm2"): None,  # pull backup of vdb
            ("mig", "vm1"): None,  # migration (once: the domain leaves)
        }
        self.ready_since: dict[uuid.UUID, int] = {}
        self.n = 0

    def xml(self, slot: tuple[str, str]) -> str:
        self.n += 1
        tag = f"{slot[0]}-{slot[1]}-{self.n}"
        if slot in (("main", "vm2"), ("side", "vm1")):  # chain jobs while there is a chain
            dom = self.soak.c(slot[0]).call(Method.DOMAIN_INFO, slot[1])
            if len(next(d for d in dom.disks if d.name == "vda").chain) < 2:
                return BACKUP.format(tag=tag)
        return {
            ("main", "vm1"): BACKUP.format(tag=tag),
            ("main", "vm2"): COMMIT,
            ("side", "vm1"): BLOCKPULL,
            ("side", "vm2"): SIM_PULL_BACKUP.format(tag=tag),
            ("mig", "vm1"): MIGRATE.format(tag=self.n),
        }[slot]

    def tick(self) -> None:
        soak = self.soak
        for slot, job in list(self.slots.items()):
            if job is not None:
                info = soak.jobs[job][1]
                if info.state is S.READY:
                    since = self.ready_since.setdefault(job, soak.cycle)
                    if soak.cycle - since >= 2:  # end it: a pull backup completes on abort
                        verb = Method.JOB_ABORT if info.type == "backup" else Method.JOB_COMPLETE
                        soak.c(slot[0]).call(verb, job)
                        soak.info(job)
                    continue
                if info.state.active:
                    continue
                soak.check(info.state is S.COMPLETED, f"sim job {job} ended {info}")
                if slot == ("mig", "vm1"):
                    self.slots[slot] = job  # gone to another host: once is all
                    continue
            if job is None or soak.jobs[job][1].state.terminal:
                if slot == ("mig", "vm1") and job is not None:
                    continue
                self.slots[slot] = soak.begin(slot[0], slot[1], self.xml(slot))


# ---- the scenarios -------------------------------------------------------------------------


class Scenarios:
    """One kill each, at a random moment of what it does (the soak's random stream)."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.n = 0

    def push_xml(self) -> tuple[str, Path]:
        self.n += 1
        target = self.soak.tmp / f"push-{self.n}.qcow2"
        return (
            "<job type='backup'><domainbackup><disks><disk name='vda' type='file'>"
            f"<target file='{target}'/></disk></disks></domainbackup></job>",
            target,
        )

    def kill_after(self, low: float, high: float) -> None:
        time.sleep(self.soak.rng.uniform(low, high))
        self.soak.restart()

    def begin_in_flight(self) -> None:
        """A JobBegin whose reply is never read: after the restart the job is whole (found
        in the domain's list, its state where it could be) or absent with no claim left."""
        soak = self.soak
        on_qemu = soak.rng.random() < 0.5
        key, domain = ("qemu", "d1") if on_qemu else ("begin", "vm1")
        if on_qemu:
            xml, target = self.push_xml()
        else:
            self.n += 1
            xml, target = BACKUP.format(tag=f"flight-{self.n}"), None
        known = {r.uuid for r in soak.c(key).jobs(domain)}
        soak.c(key).raw.request("job_begin", domain, xml, 0)
        time.sleep(soak.rng.uniform(0, 0.03))
        soak.restart()
        new = [r for r in soak.c(key).jobs(domain) if r.uuid not in known]
        soak.check(len(new) <= 1, f"one begin made {new}")
        found = f"there, {new[0].state}" if new else "absent"
        soak.outcomes[(soak.scenario, f"{'qemu' if on_qemu else 'sim'} backup", found)] += 1
        again = not new
        if new:
            job = new[0].uuid
            info = soak.c(key).info(job)
            soak.jobs[job] = (key, info)
            soak.watchers[key].resume({job: 0})  # its events so far, if any were missed
            if info.state is S.FAILED:  # its row was written, its driver start cut short
                soak.failed_ok.add(job)
                soak.check(
                    # (``started`` is the admission's: written with the job's first row)
                    info.errmsg and info.processed == 0,
                    f"in-flight begin {job} failed: {info}",
                )
                soak.check(
                    target is None or not target.exists(),
                    f"in-flight begin {job} failed ({info.errmsg}), its target {target} stays",
                )
                again = True
            else:
                soak.check(info.state in LATER[S.RUNNING], f"in-flight begin {job}: {info}")
                self._end(key, job, target)
        if again:  # no claim held by a job that does not run: the same begin runs at once
            if target is not None:
                xml, target = self.push_xml()
            job = soak.begin(key, domain, xml)
            soak.check(soak.jobs[job][1].state is S.RUNNING, f"begin again: {soak.jobs[job]}")
            self._end(key, job, target)

    def _end(self, key: str, job: uuid.UUID, target: Path | None) -> None:
        """A push backup to ``target`` completes (compared in the end); a sim one is
        aborted."""
        soak = self.soak
        if target is not None:
            soak.finish(job)
            soak.push_targets.append((job, target))
        else:
            soak.c(key).call(Method.JOB_ABORT, job)
            soak.c(key).wait(job)
            soak.info(job)

    def push_mid_copy(self) -> None:
        soak = self.soak
        xml, target = self.push_xml()
        job = soak.begin("qemu", "d1", xml)
        soak.until(job, {S.RUNNING})
        self.kill_after(0.05, 2.0)
        soak.finish(job)
        soak.push_targets.append((job, target))

    def commit_pivot(self) -> None:
        """An active commit of a fresh two-image chain: killed while it gets ready, just
        before, during or after its pivot; it ends completed, the base holding the data."""
        soak = self.soak
        self.n += 1
        name = f"c{self.n}"
        base = create(soak.tmp / f"{name}-base.qcow2", "8M")
        write(base, "write -P 0x11 0 2M")
        top = create(soak.tmp / f"{name}-top.qcow2", "8M", backing=base)
        write(top, "write -P 0x22 1M 2M")
        ref = soak.tmp / f"{name}-ref.raw"
        run("qemu-img", "convert", "-O", "raw", str(top), str(ref))
        soak.c("qemu").call(Method.CREATE_DOMAIN, domain_xml(name, {"vda": top}))
        soak.extra_guests.append(name)
        job = soak.begin("qemu", name, COMMIT)
        moment = soak.rng.choice(("ready", "pivot"))
        if moment == "ready":
            time.sleep(soak.rng.uniform(0, 0.3))
            soak.restart()
            soak.until(job, {S.READY})
        else:
            soak.until(job, {S.READY})
            soak.c("qemu").raw.request("job_complete", job.bytes)
            soak.in_flight[job] = frozenset({S.READY, S.COMPLETING, S.COMPLETED})
            time.sleep(soak.rng.uniform(0, 0.05))
            soak.restart()
        info = soak.info(job)
        if info.state is S.READY:
            soak.c("qemu").call(Method.JOB_COMPLETE, job)
        info = soak.c("qemu").wait(job)
        soak.jobs[job] = ("qemu", info)
        soak.check(info.state is S.COMPLETED, f"commit {job} ended {info}")
        dom = soak.c("qemu").call(Method.DOMAIN_INFO, name)
        chain = dom.disks[0].chain
        soak.check(chain == (str(base),), f"commit {job} left the chain {chain}")
        soak.c("qemu").call(Method.DOMAIN_DESTROY, name)
        soak.extra_guests.remove(name)
        run("qemu-img", "compare", "-q", "-F", "raw", str(base), str(ref))

    def pull_export(self) -> None:
        """A pull backup's export read slowly over NBD by qemu-io (checking the pattern)
        while jobd is killed; the reader finishes, the job is then ended: completed."""
        soak = self.soak
        self.n += 1
        sock = soak.tmp / f"nbd-{self.n}.sock"
        scratch = soak.tmp / f"scratch-{self.n}.qcow2"
        job = soak.begin(
            "qemu", "d1",
            "<job type='backup'><domainbackup mode='pull'>"
            f"<server transport='unix' socket='{sock}'/><disks><disk name='vda' "
            f"type='file'><scratch file='{scratch}'/></disk></disks></domainbackup></job>",
        )  # fmt: skip
        soak.until(job, {S.READY})
        reads = []
        for mib in range(4):
            pattern = "0x3c" if mib == 3 else "0x5a"
            reads += ["-c", f"read -P {pattern} {mib}M 1M", "-c", "sleep 150"]
        reader = subprocess.Popen(
            ["qemu-io", "-r", "-f", "raw", *reads, f"nbd+unix:///vda?socket={sock}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            time.sleep(soak.rng.uniform(0.0, 0.5))
            moment = "export read at the kill" if reader.poll() is None else "read before"
            soak.outcomes[(soak.scenario, "qemu backup", moment)] += 1
            soak.restart()
            out, _ = reader.communicate(timeout=30)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        soak.check(reader.returncode == 0 and "Pattern verification failed" not in out, out)
        soak.check(soak.info(job).state is S.READY, f"pull backup {job}: {soak.info(job)}")
        soak.finish(job, Method.JOB_ABORT)
        soak.check(not scratch.exists(), f"{scratch} left behind")

    def migrate(self) -> None:
        """A throttled same-host migration of d1, killed mid-way: completed, d1 runs in
        its new QEMU, the old one is gone."""
        soak = self.soak
        old = {int(p.read_text()) for p in soak.qdir.glob("d1.*.pid")}
        job = soak.begin(
            "qemu", "d1",
            f"<job type='migration'><destination uri='qemu:///session?dir={soak.qdir}'/>"
            "<live/><bandwidth unit='KiB/s'>32</bandwidth></job>",
        )  # fmt: skip
        soak.until(job, {S.RUNNING})
        self.kill_after(0.05, 1.5)
        soak.finish(job)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in old) and time.monotonic() < deadline:
            time.sleep(0.05)
        soak.check(not any(alive(p) for p in old), f"the migration's source {old} still runs")
        soak.guests(["d1"])

    def sim_only(self) -> None:
        self.kill_after(0.0, 0.5)


def test_kill_soak(tmp_path: Path) -> None:
    soak = Soak(tmp_path)
    disk = create(tmp_path / "d1.qcow2", "4M")
    write(disk, DATA, DATA2)
    pristine = tmp_path / "d1-pristine.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(disk), str(pristine))
    scenarios = Scenarios(soak)
    plan: list[Callable[[], None]] = [
        scenarios.begin_in_flight,
        scenarios.push_mid_copy,
        scenarios.commit_pivot,
        scenarios.pull_export,
        scenarios.migrate,
        scenarios.sim_only,
    ]
    started = time.monotonic()
    try:
        soak.start()
        soak.c("qemu").call(Method.CREATE_DOMAIN, domain_xml("d1", {"vda": disk}, memory_mib=32))
        load = SimLoad(soak)
        load.tick()
        order = [plan[i % len(plan)] for i in range(CYCLES)]
        soak.rng.shuffle(order)
        for cycle, scenario in enumerate(order, 1):
            soak.cycle, soak.scenario = cycle, scenario.__name__
            load.tick()
            scenario()
            for job in list(soak.jobs):
                soak.info(job)
            load.tick()
        soak.cycle, soak.scenario = CYCLES, "the end"
        for job, (key, info) in list(soak.jobs.items()):
            if info.state is S.READY:
                soak.c(key).call(
                    Method.JOB_ABORT if info.type == "backup" else Method.JOB_COMPLETE, job
                )
            if soak.info(job).state.active:
                soak.c(key).call(Method.JOB_ABORT, job)
            done = soak.c(key).wait(job, 60)
            soak.jobs[job] = (key, done)
        time.sleep(0.3)  # the last FINAL events reach the watchers
        soak.check_events(complete=True)
        for name in soak.live_guests():
            soak.c("qemu").call(Method.DOMAIN_DESTROY, name)
        soak.stop()
        soak.check(not _qemu_of(tmp_path), f"QEMU left running: {_qemu_of(tmp_path)}")
        for _, target in soak.push_targets:
            run("qemu-img", "compare", "-q", str(pristine), str(target))
        run("qemu-img", "compare", "-q", str(pristine), str(disk))
        _final_rows(soak)
    finally:
        if soak.daemon is not None:
            with contextlib.suppress(OSError):
                last = soak.logs / f"{soak.incarnation:02d}.log"
                last.write_bytes(soak.daemon.log_path.read_bytes())
        with contextlib.suppress(Exception):
            soak.stop()
        if soak.daemon is not None and soak.daemon.proc.poll() is None:
            soak.daemon.proc.kill()
        kill_and_reap(_qemu_of(tmp_path))
    print(f"kill soak: {CYCLES} cycles, seed {SEED}, {time.monotonic() - started:.1f} s")
    for (name, kind, move), count in sorted(soak.outcomes.items()):
        print(f"  {name:16} {kind:12} {move:22} {count}")


def _final_rows(soak: Soak) -> None:
    """The store's numbering agrees with the events: each ended job's row holds the number
    of its one FINAL event."""
    final = {ev.job: ev.seq for _, ev in soak.events if ev.kind is EventKind.FINAL}
    db = sqlite3.connect(f"file:{soak.run_dir / 'jobs.sqlite'}?mode=ro", uri=True)
    try:
        rows = dict(db.execute("SELECT uuid, event_seq FROM jobs").fetchall())
    finally:
        db.close()
    for job, seq in final.items():  # retention (600 s) outlives the soak: every row is there
        soak.check(rows.get(str(job)) == seq, f"job {job}: FINAL {seq}, row {rows.get(str(job))}")
