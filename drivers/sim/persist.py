"""The sim driver's durable records: its world and its jobs, kept in a DriverState.

Keys and values (JSON, one record per key):

* ``host:NAME`` — a simulated host's domains: disks with their chains and sizes, memory,
  checkpoints. Written when the host is created and whenever one of its domains changes
  (destroyed, a job's effect applied, moved in or out by a migration).
* ``file:["HOST","PATH"]`` — a file the simulation created on a host (format, size);
  deleted when it goes again. One key per file, so a host with many backup targets is not
  rewritten whole at each backup.
* ``job:UUID`` — a running job: what it needs to go on after a restart (type, domain,
  total, ``processed`` bytes at the wall-clock instant ``wall``, rate, phase, pause,
  converges, fail_at, the files it created, its extra stats). Written at start and at each
  change of its progress function (pause, resume, set_speed, cancel, complete, ready).
  When the job ends it becomes ``{"ended": OUTCOME, ...}`` (written together with the
  job's effect on the world) and is deleted once the store has the engine's terminal write
  too: a restart in between finds the outcome, never applies the effect twice.
* ``handover:NAME`` — a domain a completed migration handed to another fleet member
  (``host``, ``uri``, ``domain``, ``record``: what ``adopt_domain`` takes): written with the
  migration's effect (the domain gone from this world), deleted once that member has it.
* ``clock`` — a manual clock's reading (``now``, ``wall``), written at each ``advance``: a
  restarted connection's manual clock goes on from there (its time stood still while no
  process ran), so wall times never go back across a restart.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

from drivers.sim.job import Phase, SimJob
from drivers.sim.world import SimDisk, SimDomain, SimFile, SimHost
from jobcore.driver import DriverState

HOST = "host:"
FILE = "file:"
JOB = "job:"
HANDOVER = "handover:"
CLOCK = "clock"


def host_key(name: str) -> str:
    return HOST + name


def file_key(host: str, path: str) -> str:
    """``FILE + json.dumps([host, path])``, each string escaped by json's own encoder."""
    return f"{FILE}[{_json_str(host)}, {_json_str(path)}]"


#: a str as json.dumps writes it (ensure_ascii, as its defaults)
_json_str = json.encoder.encode_basestring_ascii


def job_key(job: uuid.UUID) -> str:
    return JOB + str(job)


def sim_job_key(sj: SimJob) -> str:
    """``job_key`` of a running job's UUID, made once per job."""
    key = sj.state_key
    if not key:
        key = sj.state_key = job_key(sj.job.uuid)
    return key


def dump_host(host: SimHost) -> dict[str, Any]:
    return {"domains": {name: dump_domain(dom) for name, dom in host.domains.items()}}


def dump_domain(dom: SimDomain) -> dict[str, Any]:
    """A domain's record (in its host's, and in a hand-over to another member)."""
    return {
        "uuid": str(dom.uuid),
        "memory": dom.memory,
        "disks": [_dump_disk(d) for d in dom.disks.values()],
        "checkpoints": {c: list(disks) for c, disks in dom.checkpoints.items()},
    }


def _dump_disk(d: SimDisk) -> list[Any]:
    """[name, chain, size], then (a created domain's disk) its layers' formats and bus."""
    if not d.formats and d.bus == "virtio":
        return [d.name, list(d.chain), d.virtual_size]
    return [d.name, list(d.chain), d.virtual_size, dict(d.formats), d.bus]


def _load_disk(rec: list[Any]) -> SimDisk:
    name, chain, size, *more = rec
    formats, bus = more if more else ({}, "virtio")
    return SimDisk(name, list(chain), size, dict(formats), bus)


def load_host(name: str, value: Mapping[str, Any]) -> SimHost:
    return SimHost(name, {d: load_domain(d, rec) for d, rec in value["domains"].items()})


def load_domain(name: str, d: Mapping[str, Any]) -> SimDomain:
    return SimDomain(
        name,
        uuid.UUID(d["uuid"]),
        {disk[0]: _load_disk(disk) for disk in d["disks"]},
        d["memory"],
        {c: tuple(disks) for c, disks in d["checkpoints"].items()},
    )


def dump_job(sj: SimJob, processed: int, wall: float) -> dict[str, Any]:
    return {
        "type": str(sj.job.type),
        "domain": sj.job.domain,
        "total": sj.total,
        "processed": processed,
        "wall": wall,
        "rate": None if math.isinf(sj.rate) else sj.rate,
        "paused": sj.paused,
        "phase": sj.phase.value,
        "outcome": sj.outcome,
        "converges": sj.converges,
        "fail_at": sj.fail_at,
        "fail_message": sj.fail_message,
        "created": list(sj.created),
        "extra": dict(sj.extra),
        "handover_to": sj.handover_to,
    }


def restore_job(sj: SimJob, rec: Mapping[str, Any]) -> None:
    """Give ``sj`` (built for the recovered DriverJob) the saved record's progress state;
    its base point is the saved instant (the caller places it on its clock)."""
    sj.total = int(rec["total"])
    sj.rate = math.inf if rec["rate"] is None else float(rec["rate"])
    sj.paused = bool(rec["paused"])
    sj.phase = Phase(rec["phase"])
    sj.outcome = str(rec["outcome"])
    sj.converges = bool(rec["converges"])
    sj.fail_at = None if rec["fail_at"] is None else int(rec["fail_at"])
    sj.fail_message = str(rec["fail_message"])
    sj.created = tuple(rec["created"])
    sj.extra = dict(rec["extra"])
    sj.base_bytes = float(rec["processed"])
    sj.handover_to = rec.get("handover_to")


class SimState:
    """The world's and jobs' writes to a DriverState (only when a connection has one)."""

    def __init__(self, state: DriverState) -> None:
        self.state = state

    def load(self) -> tuple[dict[str, SimHost], dict[uuid.UUID, dict[str, Any]]]:
        """The saved hosts (with their files) and job records."""
        hosts: dict[str, SimHost] = {}
        files: list[tuple[str, str, SimFile]] = []
        jobs: dict[uuid.UUID, dict[str, Any]] = {}
        for key, value in self.state.load().items():
            if key.startswith(HOST):
                hosts[key[len(HOST) :]] = load_host(key[len(HOST) :], value)
            elif key.startswith(FILE):
                host, path = json.loads(key[len(FILE) :])
                files.append((host, path, SimFile(value["format"], value["size"])))
            elif key.startswith(JOB):
                jobs[uuid.UUID(key[len(JOB) :])] = dict(value)
        for host, path, f in files:
            if host in hosts:
                hosts[host].files[path] = f
        return hosts, jobs

    def saved_clock(self) -> tuple[float, float] | None:
        """A manual clock's last reading (now, wall), if one was saved."""
        value = self.state.load().get(CLOCK)
        return None if value is None else (float(value["now"]), float(value["wall"]))

    def clock(self, now: float, wall: float) -> None:
        self.state.save(CLOCK, {"now": now, "wall": wall})

    def host(self, host: SimHost) -> None:
        self.state.save(host_key(host.name), dump_host(host))

    def file_added(self, host: SimHost, path: str, f: SimFile) -> None:
        self.state.save(file_key(host.name, path), {"format": f.format, "size": f.virtual_size})

    def file_removed(self, host: SimHost, path: str) -> None:
        self.state.delete(file_key(host.name, path))

    def job(self, sj: SimJob, processed: int, wall: float) -> None:
        self.state.save(sim_job_key(sj), dump_job(sj, processed, wall))

    def job_ended(
        self, sj: SimJob, outcome: str, errmsg: str | None, extra: Mapping[str, int | str]
    ) -> None:
        self.state.save(sim_job_key(sj), {"ended": outcome, "errmsg": errmsg, "extra": dict(extra)})

    def forget_key(self, key: str) -> None:
        """``forget_job`` by the record's key (``sim_job_key``)."""
        self.state.delete(key)

    def handovers(self) -> dict[str, dict[str, Any]]:
        """The hand-overs not yet taken in by their member, by domain name."""
        return {
            key[len(HANDOVER) :]: dict(value)
            for key, value in self.state.load().items()
            if key.startswith(HANDOVER)
        }

    def handover(self, domain: str, value: Mapping[str, Any]) -> None:
        self.state.save(HANDOVER + domain, dict(value))

    def handover_done(self, domain: str) -> None:
        self.state.delete(HANDOVER + domain)

    def forget_job(self, job: uuid.UUID) -> None:
        self.state.delete(job_key(job))
