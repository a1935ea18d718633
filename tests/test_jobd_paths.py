"""jobd's run_dir and log_file: absolute, non-empty, no NUL (ConfigError, exit 2, never a
traceback); the log file is created 0600 and never opened through a symbolic link."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from jobd_helpers import ROOT, Jobd

from jobcore.daemon.config import ConfigError, load_config
from jobcore.daemon.main import EXIT_CONFIG


def _jobd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobcore.daemon", *args],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.parametrize("key", ["run_dir", "log_file"])
@pytest.mark.parametrize("value", ["", "relative/dir", "/tmp/a\x00b"])
def test_config_paths_must_be_absolute_and_clean(tmp_path: Path, key: str, value: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"{key} = {json.dumps(value)}\n")  # JSON's \u0000 is TOML's too
    with pytest.raises(ConfigError, match=key):
        load_config(config)
    done = _jobd("--config", str(config), cwd=tmp_path)  # run_dir from the file alone
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert "Traceback" not in done.stderr
    assert key in done.stderr
    assert not (tmp_path / "jobd.sock").exists()  # never serves in the cwd


def test_cli_paths_resolve_against_the_cwd_and_refuse_empty(tmp_path: Path) -> None:
    done = _jobd("--run-dir", "", cwd=tmp_path)
    assert done.returncode == EXIT_CONFIG and "--run-dir" in done.stderr, done.stderr
    done = _jobd("--run-dir", str(tmp_path / "run"), "--log-file", "", cwd=tmp_path)
    assert done.returncode == EXIT_CONFIG and "--log-file" in done.stderr, done.stderr
    from jobcore.daemon.config import cli_path

    assert cli_path("rel/run", "--run-dir") == Path(os.getcwd(), "rel/run")


def test_log_file_is_private_and_never_follows_a_link(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    old_umask = os.umask(0o022)
    try:
        log = tmp_path / "new.log"
        daemon = Jobd(tmp_path / "run", "--log-file", str(log)).wait_ready()
        daemon.stop()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    victim = tmp_path / "victim"
    victim.write_text("protected content\n")
    planted = tmp_path / "planted.log"
    planted.symlink_to(victim)
    done = _jobd("--run-dir", str(tmp_path / "run2"), "--log-file", str(planted), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "cannot open log file" in done.stderr
    assert victim.read_text() == "protected content\n"


def test_log_file_reopened_after_rotation_never_follows_a_link(tmp_path: Path) -> None:
    import logging

    from jobcore.log import configure, get_logger

    log = tmp_path / "jobd.log"
    victim = tmp_path / "victim"
    victim.write_text("protected\n")
    try:
        configure(log_file=log)
        get_logger("jobd").info("first")
        log.rename(tmp_path / "jobd.log.1")
        log.symlink_to(victim)  # planted between the rotation and the next line
        get_logger("jobd").info("second")
    finally:
        configure(logging.WARNING)  # back to stderr
    assert victim.read_text() == "protected\n"
    assert "first" in (tmp_path / "jobd.log.1").read_text()
