"""jobd's durable default (RUN_DIR/jobs.sqlite) across kill -9 and SIGTERM: every job is
found by UUID after a restart on the same run dir, ended ones with their stats; active sim
jobs are re-attached by the sim driver and run on (a pull backup stays ready); SIGTERM
leaves them for the next jobd, ``--stop-guests`` ends them."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from jobd_helpers import BACKUP_VDB, PULL_VDA, Jobd, jobctl, write

from jobcore.daemon.config import ConfigError, load_config

MiB = 1 << 20
RATE = f"rate={MiB}"  # a 512 MiB backup runs for minutes


def _info(uri: str, job: str) -> dict[str, object]:
    shown = jobctl(uri, "info", job, "--json")
    assert shown.returncode == 0, shown.stderr
    info: dict[str, object] = json.loads(shown.stdout)
    return info


def _begin_three(tmp_path: Path, uri: str) -> tuple[str, list[str], dict[str, object]]:
    """One ended job (aborted: cancelled, with its stats) and two running ones."""
    ended = jobctl(uri, "begin", "vm1", write(tmp_path, "a.xml", BACKUP_VDB.format(tag="a")))
    assert ended.returncode == 0, ended.stderr
    ended_id = ended.stdout.strip()
    assert jobctl(uri, "abort", ended_id).returncode == 0
    assert jobctl(uri, "wait", ended_id).returncode == 4  # cancelled
    running = []
    for name, xml in (("b", BACKUP_VDB.format(tag="b")), ("c", PULL_VDA)):
        began = jobctl(uri, "begin", "vm2" if name == "c" else "vm1", write(tmp_path, name, xml))
        assert began.returncode == 0, began.stderr
        running.append(began.stdout.strip())
    stats = jobctl(uri, "stats", ended_id, "--json")
    assert stats.returncode == 0, stats.stderr
    return ended_id, running, {"info": _info(uri, ended_id), "stats": json.loads(stats.stdout)}


def test_jobd_kill_9_and_restart_finds_every_job(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    daemon = Jobd(run_dir).wait_ready()  # no --store: RUN_DIR/jobs.sqlite
    try:
        ended, running, before = _begin_three(tmp_path, daemon.uri(RATE))
        assert (run_dir / "jobs.sqlite").exists()
        for job in running:
            assert _info(daemon.uri(), job)["state"] == "running"
    finally:
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        daemon.stop()
    daemon = Jobd(run_dir).wait_ready()
    try:
        uri = daemon.uri()
        assert _info(uri, ended) == before["info"]
        stats = jobctl(uri, "stats", ended, "--json")
        assert json.loads(stats.stdout) == before["stats"]
        for job in running:
            info = _info(uri, job)
            assert info["state"] in ("running", "ready"), info
            assert info["errmsg"] is None
        listed = jobctl(uri, "list", "--all", "--json")
        assert listed.returncode == 0, listed.stderr
        assert {j["uuid"] for j in json.loads(listed.stdout)} == {ended, *running}
    finally:
        assert daemon.stop() == 0
    daemon = Jobd(run_dir).wait_ready()  # SIGTERM above left them: still there, running
    try:
        for job in running:
            info = _info(daemon.uri(), job)
            assert info["state"] in ("running", "ready") and info["errmsg"] is None, info
            assert jobctl(daemon.uri(), "abort", job).returncode == 0
            assert jobctl(daemon.uri(), "wait", job).returncode in (0, 4)  # pull: completes
    finally:
        assert daemon.stop() == 0


def test_jobd_sigterm_with_stop_guests_ends_the_jobs(tmp_path: Path) -> None:
    """With ``--stop-guests`` SIGTERM ends the jobs as a closing connection ends them, and
    that is what the next jobd shows."""
    run_dir = tmp_path / "run"
    daemon = Jobd(run_dir, "--stop-guests").wait_ready()
    try:
        _, running, _ = _begin_three(tmp_path, daemon.uri(RATE))
    finally:
        assert daemon.stop() == 0
    daemon = Jobd(run_dir).wait_ready()
    try:
        for job in running:
            info = _info(daemon.uri(), job)
            assert (info["state"], info["errmsg"]) == ("failed", "the connection was closed")
    finally:
        assert daemon.stop() == 0


def test_stop_guests_config_key(tmp_path: Path) -> None:
    config = tmp_path / "jobd.toml"
    config.write_text("stop_guests = true\n")
    assert load_config(config).stop_guests is True
    assert load_config(None).stop_guests is False
    config.write_text("stop_guests = 'yes'\n")
    with pytest.raises(ConfigError, match="stop_guests must be true or false"):
        load_config(config)
