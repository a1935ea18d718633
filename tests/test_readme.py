"""Every code block of README.md runs as written (issue 8, item 25): python blocks in a fresh
interpreter, sh blocks in bash from the clone's root (``set -e``), with ``TMPDIR`` in the
test's tmp_path so ``mktemp`` and everything the tour makes stay there."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def readme_blocks(lang: str) -> list[str]:
    return [body for kind, body in _BLOCK.findall((ROOT / "README.md").read_text()) if kind == lang]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "JOBCORE_URI"}
    env["TMPDIR"] = str(tmp_path)
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "xdg")  # never the user's default jobd
    (tmp_path / "xdg").mkdir(exist_ok=True)
    return env


def test_readme_has_the_blocks_this_test_runs() -> None:
    assert len(readme_blocks("python")) == 2
    assert len(readme_blocks("sh")) == 1


@pytest.mark.parametrize("index", range(len(readme_blocks("python"))))
def test_readme_python_block_runs(index: int, tmp_path: Path) -> None:
    script = tmp_path / f"readme_{index}.py"
    script.write_text(readme_blocks("python")[index])
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(tmp_path),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "completed" in done.stdout or "True" in done.stdout, done.stdout


def _stop_leftover_daemons(tmp_path: Path) -> list[int]:
    left = []
    for pidfile in [*tmp_path.glob("*/run/jobd.pid"), *tmp_path.glob("run/jobd.pid")]:
        try:
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGKILL)
            left.append(pid)
        except (ValueError, OSError):
            pass
    return left


def test_readme_tour_runs(tmp_path: Path) -> None:
    (tour,) = readme_blocks("sh")
    try:
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", tour],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=_env(tmp_path),
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
        (run_dir,) = tmp_path.glob("tmp.*/run")
        log = run_dir.parent / "jobd.log"
        deadline = time.monotonic() + 15
        while '"event": "jobd stopped"' not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert '"event": "jobd stopped"' in log.read_text(), "jobd did not stop on SIGTERM"
        assert not (run_dir / "jobd.pid").exists()
        assert done.stdout.startswith("Name ")  # jobctl domains came first
        assert "completed" in done.stderr  # jobctl wait "$B"
    finally:
        assert _stop_leftover_daemons(tmp_path) == []


def test_jobd_daemon_returns_once_it_serves(tmp_path: Path) -> None:
    """`jobd --daemon` then a client at once: never "cannot reach" (the README's old
    `jobd &` raced about 1 time in 5)."""
    jobd = Path(sys.executable).with_name("jobd")
    run_dir = tmp_path / "run"
    env = _env(tmp_path)
    try:
        for _ in range(10):
            started = subprocess.run(
                [str(jobd), "--daemon", "--run-dir", str(run_dir), "--log-file",
                 str(tmp_path / "jobd.log")],
                capture_output=True, text=True, env=env, timeout=30, check=False,
            )  # fmt: skip
            assert (started.returncode, started.stdout, started.stderr) == (0, "", "")
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(run_dir / "jobd.sock"))  # no retry: it serves already
            again = subprocess.run(
                [str(jobd), "--daemon", "--run-dir", str(run_dir)],
                capture_output=True, text=True, env=env, timeout=30, check=False,
            )  # fmt: skip
            assert again.returncode == 9 and "already serving" in again.stderr
            pid = int((run_dir / "jobd.pid").read_text())
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while (run_dir / "jobd.pid").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not (run_dir / "jobd.pid").exists()
        bad = subprocess.run(
            [str(jobd), "--daemon", "--run-dir", str(run_dir), "--log-file",
             str(tmp_path / "no" / "such" / "dir.log")],
            capture_output=True, text=True, env=env, timeout=30, check=False,
        )  # fmt: skip
        assert bad.returncode == 1 and "cannot open log file" in bad.stderr
    finally:
        assert _stop_leftover_daemons(tmp_path) == []
