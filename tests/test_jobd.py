"""jobd and jobctl end to end: a real daemon process, jobctl as a subprocess."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgpack  # type: ignore[import-untyped]
import pytest
from jobd_helpers import (
    BACKUP_VDA,
    BACKUP_VDB,
    PULL_VDA,
    ROOT,
    Jobd,
    MiB,
    frame,
    jobctl,
    one_line_error,
    read_msg,
    write,
)

import jobcore
from jobcore.cli import ExitCode
from jobcore.protocol import PROTOCOL_VERSION


@pytest.fixture(scope="module")
def jobd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobd]:
    daemon = Jobd(tmp_path_factory.mktemp("jobd") / "run").wait_ready()
    try:
        yield daemon
    finally:
        daemon.stop()


# ---- jobctl against a running jobd ------------------------------------------------------


def test_begin_list_info_stats_dumpxml_abort(jobd: Jobd, tmp_path: Path) -> None:
    uri = jobd.uri(f"rate={4 * MiB}", host="slow")  # slow: a vdb backup would take two minutes
    xml = write(tmp_path, "b.xml", BACKUP_VDB.format(tag="t1"))
    began = jobctl(uri, "begin", "vm1", xml)
    assert began.returncode == 0, began.stderr
    job = began.stdout.strip()
    assert len(job) == 36

    listed = jobctl(uri, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["state"] for r in rows if r["uuid"] == job] == ["running"]

    info = json.loads(jobctl(uri, "info", job, "--json").stdout)
    assert info["uuid"] == job and info["state"] == "running" and info["domain"] == "vm1"
    assert jobctl(uri, "info", job[:8]).stdout.startswith(f"UUID:          {job}")

    stats = json.loads(jobctl(uri, "stats", job, "--json").stdout)
    assert stats["uuid"] == job and stats["state"] == "running"
    assert stats["disk_total"] == 512 * MiB and stats["operation"] == 9

    assert f"<uuid>{job}</uuid>" in jobctl(uri, "dumpxml", job).stdout

    legacy = jobctl(uri, "info", "--legacy", "vm1").stdout.splitlines()
    assert legacy[0] == "Job type:         Unbounded"
    assert legacy[1] == "Operation:        Backup"
    assert legacy[2].startswith("Time elapsed:     ") and legacy[2].endswith(" ms")
    assert "File total:       512.000 MiB" in legacy

    assert jobctl(uri, "pause", job).returncode == 0
    assert json.loads(jobctl(uri, "info", job, "--json").stdout)["state"] == "paused"
    assert jobctl(uri, "resume", job).returncode == 0
    aborted = jobctl(uri, "abort", job)
    assert aborted.returncode == 0, aborted.stderr
    waited = jobctl(uri, "wait", job, "--json")
    assert waited.returncode == ExitCode.JOB_CANCELLED
    assert json.loads(waited.stdout)["state"] == "cancelled"
    everything = json.loads(jobctl(uri, "list", "--all", "--json", "--domain", "vm1").stdout)
    assert any(r["uuid"] == job and r["state"] == "cancelled" for r in everything)


def test_begin_wait_shows_progress(jobd: Jobd, tmp_path: Path) -> None:
    uri = jobd.uri(f"rate={512 * MiB}", host="r512m")  # a vdb backup takes about a second
    xml = BACKUP_VDB.format(tag="t2")
    done = jobctl(uri, "begin", "vm2", "-", "--wait", stdin=xml)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip()
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith(f"{job} running")
    assert lines[-1] == f"{job} completed"
    final = json.loads(jobctl(uri, "info", job, "--json").stdout)
    assert final["state"] == "completed" and final["progress"] == 100.0


def test_conflict_and_refusals_exit_codes(jobd: Jobd, tmp_path: Path) -> None:
    uri = jobd.uri(f"rate={2 * MiB}", host="r2m")
    holder = jobctl(uri, "begin", "vm1", write(tmp_path, "b.xml", BACKUP_VDA.format(tag="c")))
    assert holder.returncode == 0, holder.stderr
    refused = jobctl(uri, "begin", "vm1", write(tmp_path, "p.xml", PULL_VDA))
    assert refused.returncode == ExitCode.CONFLICT
    assert holder.stdout.strip() in one_line_error(refused)

    bad = jobctl(uri, "begin", "vm1", "-", stdin="<job type='nonsense'/>")
    assert bad.returncode == ExitCode.ERROR
    one_line_error(bad)
    missing = jobctl(uri, "info", "0b3c9f6e-0000-4000-8000-000000000000")
    assert missing.returncode == ExitCode.NOT_FOUND
    one_line_error(missing)
    assert jobctl(uri, "info", "xyz").returncode == ExitCode.USAGE
    assert jobctl(uri, "frobnicate").returncode == ExitCode.USAGE
    gone = jobctl(f"sim+unix:///default?socket={tmp_path}/none.sock", "list")
    assert gone.returncode == ExitCode.UNREACHABLE
    assert "cannot reach jobd" in one_line_error(gone)
    jobctl(uri, "abort", holder.stdout.strip())


def test_events_stream(jobd: Jobd, tmp_path: Path) -> None:
    uri = jobd.uri(f"rate={1024 * MiB}", host="r1g")
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobcore.cli",
            "-c",
            uri,
            "events",
            "--json",
            "-d",
            "vm2",
            "--no-progress",
            "--count",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert watcher.stderr is not None and watcher.stdout is not None
        assert "watching events" in watcher.stderr.readline()
        began = jobctl(uri, "begin", "vm2", write(tmp_path, "b.xml", BACKUP_VDB.format(tag="e")))
        job = began.stdout.strip()
        out, _ = watcher.communicate(timeout=20)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["kind"], e["state"]) for e in events] == [
        ("state", "running"),
        ("state", "completed"),
        ("final", "completed"),
    ]
    assert all(e["uuid"] == job for e in events)
    assert events[-1]["stats"]["success"] is True
    assert watcher.returncode == 0


def test_read_only_socket_refuses_writes(jobd: Jobd, tmp_path: Path) -> None:
    ro = jobd.uri(f"rate={4 * MiB}", readonly=True, host="slow")
    refused = jobctl(ro, "begin", "vm1", write(tmp_path, "b.xml", BACKUP_VDB.format(tag="r")))
    assert refused.returncode == ExitCode.DENIED
    assert "read-only" in one_line_error(refused)
    listed = jobctl(ro, "list", "--json")
    assert listed.returncode == 0 and isinstance(json.loads(listed.stdout), list)
    rw_job = jobctl(
        jobd.uri(f"rate={4 * MiB}", host="slow"),
        "begin",
        "vm1",
        write(tmp_path, "b2.xml", BACKUP_VDB.format(tag="r2")),
    ).stdout.strip()
    assert json.loads(jobctl(ro, "stats", rw_job, "--json").stdout)["uuid"] == rw_job
    assert jobctl(ro, "abort", rw_job).returncode == ExitCode.DENIED
    assert jobctl(jobd.uri(f"rate={4 * MiB}", host="slow"), "abort", rw_job).returncode == 0


# ---- the protocol under abuse -----------------------------------------------------------


def test_malformed_frames_get_error_replies(jobd: Jobd) -> None:
    with socket.socket(socket.AF_UNIX) as bystander, socket.socket(socket.AF_UNIX) as s:
        bystander.connect(str(jobd.sock))
        bystander.sendall(
            frame(msgpack.packb([0, 1, "hello", [PROTOCOL_VERSION, "sim:///default"]]))
        )
        assert read_msg(bystander)[:2] == [1, 1]
        s.settimeout(10)
        s.connect(str(jobd.sock))
        for garbage in (
            b"\xc1\xc1",
            msgpack.packb({"x": 1}),
            msgpack.packb([0, 7, "nope", []]),
            msgpack.packb([0, 8, "lookup_domain", [42]]),
            msgpack.packb([9, 9]),
        ):
            s.sendall(frame(garbage))
            reply = read_msg(s)
            assert reply[0] == 2 and reply[2] == "BadRequest", reply
        assert call_raw(s, [0, 8, "lookup_domain", ["vm1"]])[0] == 2  # hello first
        assert call_raw(s, [0, 10, "hello", [PROTOCOL_VERSION, "sim:///default"]])[:2] == [1, 10]
        reply = call_raw(s, [0, 11, "lookup_domain", ["vm1"]])
        assert reply[:2] == [1, 11] and reply[2][0] == "vm1"
        s.sendall(struct.pack(">I", 64 << 20))  # over the frame limit: answered, hung up
        assert read_msg(s)[0] == 2
        assert s.recv(1) == b""
        bystander.sendall(frame(msgpack.packb([0, 2, "list_domains", []])))
        assert read_msg(bystander)[:2] == [1, 2]


def call_raw(sock: socket.socket, msg: list[object]) -> list[Any]:
    sock.sendall(frame(msgpack.packb(msg)))
    return read_msg(sock)


def test_vanishing_client_affects_nobody(jobd: Jobd) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(jobd.sock))
        s.sendall(frame(msgpack.packb([0, 1, "hello", [PROTOCOL_VERSION, "sim:///default"]])))
        read_msg(s)
        s.sendall(frame(msgpack.packb([0, 2, "subscribe", [None, None, None, None, 16]])))
        s.sendall(frame(msgpack.packb([0, 3, "list_domains", []]))[:5])  # half a frame
    assert jobctl(jobd.uri(), "domains", "--json").returncode == 0


def test_many_concurrent_clients(jobd: Jobd) -> None:
    uri = jobd.uri("rate=0", host="instant")
    states: list[str] = []

    async def client(i: int) -> None:
        async with jobcore.connect(uri) as conn:
            dom = await conn.lookup_domain("vm1" if i % 2 else "vm2")
            job = await dom.job_begin(BACKUP_VDB.format(tag=f"many{i}"))
            states.append(str((await job.wait(timeout=20)).state))
            assert any(j.uuid == job.uuid for j in await dom.list_jobs())

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(client, i)

    anyio.run(main)
    assert states == ["completed"] * 20


# ---- daemon lifecycle -------------------------------------------------------------------


def test_second_daemon_on_same_run_dir_is_refused(jobd: Jobd) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "jobcore.daemon", "--run-dir", str(jobd.run_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert second.returncode == ExitCode.DAEMON_RUNNING
    assert f"pid {jobd.proc.pid}" in second.stderr and "already" in second.stderr
    assert jobd.sock.exists() and jobctl(jobd.uri(), "domains").returncode == 0


def test_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    daemon = Jobd(tmp_path / "run", "--log-level", "debug").wait_ready()
    uri = daemon.uri(f"rate={MiB}")
    began = jobctl(uri, "begin", "vm1", write(tmp_path, "b.xml", BACKUP_VDB.format(tag="s")))
    assert began.returncode == 0, began.stderr
    # a waiting client reconnects to a jobd that comes back (tests/test_reconnect.py);
    # this one gives up 2 s after the stop
    waiting = ["-c", f"{uri}&reconnect=2", "wait", began.stdout.strip()]
    watcher = subprocess.Popen(
        [sys.executable, "-m", "jobcore.cli", *waiting],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    time.sleep(0.5)
    assert daemon.stop() == 0
    assert not daemon.sock.exists() and not daemon.ro_sock.exists()
    assert not (daemon.run_dir / "jobd.pid").exists()
    logs = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    assert any(e["event"] == "shutting down" and e["signal"] == "SIGTERM" for e in logs)
    assert any(e["event"] == "client connected" and e["peer_uid"] == os.getuid() for e in logs)
    assert logs[-1]["event"] == "jobd stopped"
    _, err = watcher.communicate(timeout=10)
    assert watcher.returncode in (ExitCode.JOB_FAILED, ExitCode.UNREACHABLE), err


def test_config_file_and_uid_allow_list(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 'blue'\n")
    refused = subprocess.run(
        [sys.executable, "-m", "jobcore.daemon", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert refused.returncode == 2 and "colour" in refused.stderr

    config = tmp_path / "jobd.toml"
    config.write_text(
        f"run_dir = '{tmp_path / 'run'}'\nallowed_uids = [{os.getuid() + 4242}]"
        "\nretention = 5\nlog_level = 'warning'\n"
    )
    daemon = Jobd(tmp_path / "run", "--config", str(config))
    try:
        daemon.wait_ready()
        denied = jobctl(daemon.uri(), "domains")
        assert denied.returncode == ExitCode.DENIED
        assert "not allowed" in one_line_error(denied)
    finally:
        assert daemon.stop() == 0


def test_embedded_default_when_no_daemon(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    listed = jobctl(None, "domains", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [d["name"] for d in json.loads(listed.stdout)] == ["vm1", "vm2"]
    xml = BACKUP_VDB.format(tag="emb")
    began = jobctl(None, "begin", "vm1", "-", stdin=xml, env={**env, "JOBCORE_URI": ""})
    assert began.returncode == 0, began.stderr
    assert "lives only as long as this command" in began.stderr
    assert began.stderr.strip().endswith("completed")
