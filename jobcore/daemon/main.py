"""jobd's entry point: ``jobd`` and ``jobctl daemon`` (options, configuration, detaching,
the file-descriptor limit, exit statuses).

    jobd --run-dir DIR [--config FILE] [--log-level LEVEL]
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import click

from jobcore.daemon.config import (
    _LEVELS,
    BUSY_POLL_US,
    DEFAULT_ALLOWED_URIS,
    FD_HEADROOM,
    MAX_BUSY_POLL_US,
    ConfigError,
    DaemonConfig,
    cli_path,
    load_config,
)
from jobcore.daemon.rundir import DaemonAlreadyRunning
from jobcore.daemon.server import Daemon
from jobcore.errors import JobError, StoreError, leaf_error
from jobcore.fleet import LEASE_TTL
from jobcore.log import configure
from jobcore.protocol import default_run_dir
from jobcore.scheduler import POLICY_TABLES

#: jobd's exit status when another daemon holds the run directory.
EXIT_ALREADY_RUNNING = 9
#: jobd's exit status for a bad configuration (unreadable file, unknown key, bad value).
EXIT_CONFIG = 2


# ---- entry point ------------------------------------------------------------------------


def run_daemon(config: DaemonConfig, *, detach: bool = False) -> int:
    """Run jobd until SIGTERM/SIGINT; the process exit status.

    In the foreground, or with ``detach`` (``--daemon``) in a child process: the calling
    process returns 0 only once both sockets accept connections, or the child's exit status
    if it could not start (libvirtd's ``--daemon`` behaves the same way)."""
    fd_problem = raise_fd_limit(config)
    if fd_problem is not None:
        click.echo(f"jobd: {fd_problem}", err=True)
        return EXIT_CONFIG
    ready = _nothing
    if detach:
        status, ready = _detach(config)
        if status is not None:
            return status
    try:
        configure(getattr(logging, config.log_level.upper()), log_file=config.log_file)
    except OSError as exc:
        click.echo(f"jobd: cannot open log file '{config.log_file}': {exc.strerror}", err=True)
        return 1

    async def serve() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(Daemon(config).run)
            ready()

    try:
        anyio.run(serve)
    except Exception as exc:
        leaf = leaf_error(exc)
        if isinstance(leaf, DaemonAlreadyRunning):
            click.echo(f"jobd: {leaf}", err=True)
            return EXIT_ALREADY_RUNNING
        if isinstance(leaf, StoreError):  # corrupt, locked, newer schema: it says what
            click.echo(f"jobd: {leaf}", err=True)
            return 1
        if not isinstance(leaf, OSError | JobError):
            raise
        click.echo(f"jobd: cannot serve in '{config.run_dir}': {leaf}", err=True)
        return 1
    return 0


def _nothing() -> None:
    pass


def raise_fd_limit(config: DaemonConfig) -> str | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; what is wrong if the clients
    ``config`` allows, plus FD_HEADROOM, still do not fit (None when they do)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        for target in (hard, 1 << 20):  # an infinite hard limit: the kernel's nr_open
            if target == resource.RLIM_INFINITY or target <= soft:
                continue
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (OSError, ValueError):
                continue
            soft = target
            break
    needed = config.max_clients + config.max_ro_clients + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < needed:
        return (
            f"max_clients ({config.max_clients}) + max_ro_clients ({config.max_ro_clients}) + "
            f"{FD_HEADROOM} file descriptors for jobd itself = {needed}, more than the open "
            f"file limit allows ({soft}; hard limit {hard}): lower max_clients or "
            "max_ro_clients, or raise the limit (ulimit -n, systemd's LimitNOFILE=)"
        )
    return None


def _detach(config: DaemonConfig) -> tuple[int | None, Callable[[], None]]:
    """Fork. The parent gets the exit status to return: 0 once the child reports that it
    serves, else the child's own status. The child gets None and the function that reports
    readiness (and then, with a log file, lets go of the caller's stderr)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            if pipe.read(1) == b"R":
                return 0, _nothing
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) or 1, _nothing
    os.close(read_end)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)

    def ready() -> None:
        os.write(write_end, b"R")
        os.close(write_end)
        if config.log_file is not None:
            os.dup2(null, 2)  # the caller's terminal or pipe is not held open
        os.close(null)

    return None, ready


def daemon_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """jobd's options, shared by ``jobd`` and ``jobctl daemon``."""
    for option in reversed(
        [
            click.option(
                "--run-dir",
                type=click.Path(file_okay=False),
                help=f"Directory of the sockets and pid file [default: {default_run_dir()}].",
            ),
            click.option(
                "--config",
                "config_file",
                type=click.Path(dir_okay=False, path_type=Path),
                help="TOML file: run_dir, allowed_uids, allowed_uris, retention, log_level, "
                "max_clients, max_ro_clients, hello_timeout, idle_timeout, driver_idle_timeout, "
                "subscriber_lost_limit, max_subscriptions, max_retained_per_domain, max_retained, "
                "log_file, frame_timeout, max_receive_buffer, max_ro_clients_per_uid, "
                "ro_idle_timeout, max_ro_subscriptions, max_ro_subscriptions_per_uid, "
                "ro_max_event_buffer, ro_subscriber_lost_limit, max_queued_send, "
                "max_ro_queued_send, max_ro_receive_buffer, store, host, stop_guests, "
                "shared_roots, lease_ttl, policy, busy_poll_us.",
            ),
            click.option(
                "--store",
                metavar="URL",
                help="Job store: 'memory:', 'sqlite:///ABS/PATH' or 'postgresql://…' "
                "[default: sqlite:///RUN_DIR/jobs.sqlite].",
            ),
            click.option(
                "--host",
                metavar="NAME",
                help="This jobd's name in its fleet, carried by every job record "
                "[config: host; default: the machine's hostname].",
            ),
            click.option(
                "--shared-root",
                "shared_roots",
                multiple=True,
                metavar="[ID=]PATH",
                help="Storage the fleet's hosts share (repeatable; replaces the config's "
                "shared_roots): claims on images below PATH are taken fleet-wide, under the "
                "storage ID (default: PATH itself) [PostgreSQL stores].",
            ),
            click.option(
                "--lease-ttl",
                type=float,
                metavar="SECONDS",
                help="Seconds this fleet member's lease lasts unless renewed; other members "
                f"report it lost after that [config: lease_ttl; default: {LEASE_TTL:g}].",
            ),
            click.option(
                "--policy",
                type=click.Choice(sorted(POLICY_TABLES)),
                help="The conflict policy table of every driver connection: what a job does "
                "about a job in its way, per pair of job types; 'kubevirt': a migration "
                "preempts a backup of its domain (given a higher priority). A job's own "
                "<policy> still wins [config: policy; default: default].",
            ),
            click.option(
                "--stop-guests",
                is_flag=True,
                default=None,
                help="On SIGTERM end the active jobs (failed: 'the connection was closed') "
                "as a closing connection does, instead of leaving them and their guests "
                "running for the next start to recover [config: stop_guests].",
            ),
            click.option(
                "--log-level", type=click.Choice(sorted(_LEVELS)), help="Log level [default: info]."
            ),
            click.option(
                "--log-file",
                type=click.Path(dir_okay=False),
                help="Log to this file (JSON lines) instead of stderr; reopened when "
                "logrotate moves it away.",
            ),
            click.option(
                "--retention", type=float, help="Seconds ended jobs are kept [default: 600]."
            ),
            click.option(
                "--allow-uri",
                "allowed_uris",
                multiple=True,
                metavar="PATTERN",
                help="Driver URI clients may open (fnmatch; repeatable; replaces the config's "
                f"allowed_uris) [default: {' '.join(DEFAULT_ALLOWED_URIS)}].",
            ),
            click.option(
                "--busy-poll-us",
                type=int,
                metavar="US",
                help="Microseconds a client's read loop polls its socket after a reply before "
                "it sleeps, while one client is busy (0: never; at most "
                f"{MAX_BUSY_POLL_US}) [default: {BUSY_POLL_US}].",
            ),
            click.option(
                "-d",
                "--daemon",
                "detach",
                is_flag=True,
                help="Detach: return (exit 0) once the sockets accept connections, or "
                "fail with jobd's exit status; the pid is in RUN_DIR/jobd.pid.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def start_from_options(
    run_dir: str | Path | None,
    config_file: Path | None,
    log_level: str | None,
    retention: float | None,
    allowed_uris: tuple[str, ...] = (),
    log_file: str | Path | None = None,
    detach: bool = False,
    store: str | None = None,
    stop_guests: bool | None = None,
    host: str | None = None,
    shared_roots: tuple[str, ...] = (),
    lease_ttl: float | None = None,
    policy: str | None = None,
    busy_poll_us: int | None = None,
) -> int:
    try:
        config = load_config(
            config_file,
            run_dir=cli_path(run_dir, "--run-dir"),
            log_level=log_level,
            retention=retention,
            allowed_uris=list(allowed_uris) or None,
            log_file=cli_path(log_file, "--log-file"),
            store=store,
            stop_guests=stop_guests,
            host=host,
            shared_roots=list(shared_roots) or None,
            lease_ttl=lease_ttl,
            policy=policy,
            busy_poll_us=busy_poll_us,
        )
    except ConfigError as exc:
        click.echo(f"jobd: {exc}", err=True)
        return EXIT_CONFIG
    return run_daemon(config, detach=detach)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@daemon_options
@click.version_option(package_name="jobcore", prog_name="jobd")
def main(**options: Any) -> None:
    """jobd: serve the jobcore API over UNIX sockets in RUN_DIR (jobd.sock read-write,
    jobd-ro.sock read-only) until SIGTERM or SIGINT (SIGHUP reopens a moved log file); in
    the foreground unless --daemon."""
    sys.exit(start_from_options(**options))
