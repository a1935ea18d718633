"""jobctl: the jobcore command line (design/daemon.md "jobctl", README "Tour: jobd and jobctl").

``-c URI`` (or ``$JOBCORE_URI``) picks the connection; by default the local jobd's socket
in the default run directory when a daemon answers there, else the embedded
``sim:///default`` (where jobs live only as long as the command, so ``begin`` waits).
JOB arguments take a job UUID or a unique prefix of one (at least 4 hex digits).
Every read command takes ``--json``. Exit status: see ``ExitCode``.

    fast       the ``jobctl`` script: a remote ``list`` answered without click, else app
    app        the root group (``main``) and the command table
    declare    options declared once, for click and the fast start
    commands/  jobs, domains, events, daemon: one module per group of commands
    session    the connection a command runs on, errors to exit statuses, JOB resolution
    options    shared arguments and options, shell completion, BANDWIDTH, XML files
    render     tables, virsh layouts, event lines, JSON (plain: what needs no click)
    follow     waiting for a job with a live progress bar or lines
    errors     ``ExitCode`` and the one-line refusal on stderr

``main`` and ``ExitCode`` are imported on first use: the fast start loads no click.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
    from jobcore.cli.app import main
    from jobcore.cli.errors import ExitCode

__all__ = ["ExitCode", "main"]


def __getattr__(name: str) -> object:
    if name == "main":
        from jobcore.cli.app import main

        return main
    if name == "ExitCode":
        from jobcore.cli.errors import ExitCode

        return ExitCode
    raise AttributeError(f"module 'jobcore.cli' has no attribute '{name}'")
