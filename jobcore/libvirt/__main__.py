"""``python -m jobcore.libvirt --path``: the directory to put first on PYTHONPATH, which
holds ``libvirt.py`` and ``libvirt_qemu.py`` (jobcore.libvirt under libvirt's names)."""

from __future__ import annotations

import sys

from jobcore.libvirt.shimdir import shim_dir

USAGE = "usage: python -m jobcore.libvirt --path"


def main(argv: list[str]) -> int:
    if argv != ["--path"]:
        sys.stderr.write(USAGE + "\n")
        return 2
    sys.stdout.write(f"{shim_dir()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
