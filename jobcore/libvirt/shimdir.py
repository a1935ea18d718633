"""Where the ``libvirt.py`` and ``libvirt_qemu.py`` shims live, and the import path that
runs a program on them (``jobctl run``). Imports nothing of jobcore: ``jobctl run`` uses it
without loading the libvirt module itself."""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Mapping
from pathlib import Path

#: the package's directory of shim modules (not a package: only ever on sys.path)
SHIM_DIR = Path(__file__).resolve().parent / "shim"


def shim_dir() -> Path:
    return SHIM_DIR


def jobcore_root() -> Path:
    """The directory holding the ``jobcore`` (and ``drivers``) packages."""
    return Path(__file__).resolve().parents[2]


def run_path(environ: Mapping[str, str]) -> str:
    """PYTHONPATH for a program run on jobcore's libvirt: the shims first, then jobcore
    itself, then this interpreter's site-packages (jobcore's dependencies, and its
    entry points, for another interpreter of the same minor version such as Debian's
    /usr/bin/python3), then what PYTHONPATH held before."""
    paths = sysconfig.get_paths()
    entries = [str(SHIM_DIR), str(jobcore_root()), paths["purelib"], paths["platlib"]]
    entries += [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    seen: list[str] = []
    for entry in entries:
        if entry not in seen:
            seen.append(entry)
    return os.pathsep.join(seen)
