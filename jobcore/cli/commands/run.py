"""``jobctl run -- CMD [ARGS…]``: run a libvirt-python program unmodified on jobcore."""

from __future__ import annotations

import os

import click

from jobcore.cli.errors import exit_with
from jobcore.libvirt.shimdir import run_path

#: the shell's statuses for a command that cannot be run
NOT_EXECUTABLE = 126
NOT_FOUND = 127


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(command: tuple[str, ...]) -> None:
    """Run COMMAND with jobcore's libvirt module first on its import path.

    \b
    PYTHONPATH gets, in front of what it held: the directory of libvirt.py and
    libvirt_qemu.py (python -m jobcore.libvirt --path), jobcore, and this
    interpreter's site-packages, so that another Python of the same minor version
    (Debian's /usr/bin/python3) imports them too. COMMAND replaces jobctl: its exit
    status is jobctl's. There, qemu:///session and sim:///NAME reach the jobd of the
    default run directory when one runs.

    \b
    Example: jobctl run -- virtnbdbackup -U qemu:///session -d vm1 -l full -o DIR
    """
    env = {**os.environ, "PYTHONPATH": run_path(os.environ)}
    try:
        os.execvpe(command[0], list(command), env)
    except FileNotFoundError:
        exit_with(NOT_FOUND, f"jobctl: error: {command[0]}: command not found")
    except PermissionError as exc:
        exit_with(NOT_EXECUTABLE, f"jobctl: error: {command[0]}: {exc.strerror}")
    except OSError as exc:
        exit_with(NOT_EXECUTABLE, f"jobctl: error: {command[0]}: {exc}")
