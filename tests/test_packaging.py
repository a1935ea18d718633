"""The package alone (issue 8, item 23): installed with nothing but its declared dependencies
in a clean venv, it opens ``sim:///default`` and ``qemu:///session``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_USE = textwrap.dedent(
    """
    import importlib.util, sys
    import jobcore
    assert "/src/" not in jobcore.__file__ and "site-packages" in jobcore.__file__, jobcore.__file__
    assert importlib.util.find_spec("hypothesis") is None, "test extras leaked into the venv"
    conn = jobcore.open("sim:///default")
    print("sim", sorted(d.name() for d in conn.listAllDomains()))
    conn.close()
    conn = jobcore.open(f"qemu:///session?dir={sys.argv[1]}")
    print("qemu", [d.name() for d in conn.listAllDomains()])
    conn.close()
    """
)


@pytest.mark.slow
def test_package_alone_in_a_clean_venv(tmp_path: Path) -> None:
    # a copy of the work tree, so that building the wheel leaves nothing in it
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "benchmarks"
        ),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
         "--disable-pip-version-check", str(src)],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr + installed.stdout
    used = subprocess.run(
        [str(python), "-I", "-c", _USE, str(tmp_path / "qemu-run")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert used.returncode == 0, used.stderr
    assert used.stdout.splitlines() == ["sim ['vm1', 'vm2']", "qemu []"]
    version = subprocess.run(
        [str(venv / "bin" / "jobctl"), "--version"], capture_output=True, text=True, check=False
    )
    assert version.returncode == 0 and version.stdout.startswith("jobctl, version "), version
