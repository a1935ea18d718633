"""jobctl as a user meets it (issue 8, item 27): whole UUIDs on an 80-column terminal, quiet
pipes, timeouts and unknown domains that say what happened, --version, set-speed, domain
create/destroy, shell completion."""

from __future__ import annotations

import fcntl
import importlib
import importlib.metadata
import json
import os
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from jobd_helpers import BACKUP_VDB, PULL_VDA, ROOT, Jobd, jobctl, write
from qemu_helpers import create, domain_xml

from jobcore.cli import ExitCode, main
from jobcore.cli.app import COMMANDS
from jobcore.cli.options import parse_bandwidth
from jobcore.daemon.main import start_from_options

MiB = 1 << 20
JOBCTL = Path(sys.executable).with_name("jobctl")  # the installed console script


@pytest.fixture(scope="module")
def jobd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobd]:
    daemon = Jobd(tmp_path_factory.mktemp("jobctl") / "run").wait_ready()
    try:
        yield daemon
    finally:
        daemon.stop()


def _slow_job(jobd: Jobd, tmp_path: Path, domain: str = "vm1") -> tuple[str, str]:
    """A block pull at 1 MiB/s (minutes of work) and the URI it runs on."""
    uri = jobd.uri("rate=1048576")
    began = jobctl(uri, "begin", domain, write(tmp_path, "pull.xml", PULL_VDA))
    assert began.returncode == 0, began.stderr
    return uri, began.stdout.strip()


def _env(uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["JOBCORE_URI"] = uri
    return env


def _run_on_terminal(argv: list[str], env: dict[str, str], columns: int = 80) -> str:
    """Run ``argv`` with stdin/stdout/stderr on a pseudo-terminal of ``columns``."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        proc.wait(10)
    assert proc.returncode == 0, out
    return out.decode(errors="replace")


def test_list_never_truncates_uuids_on_80_columns(jobd: Jobd, tmp_path: Path) -> None:
    uri, job = _slow_job(jobd, tmp_path)
    try:
        shown = _run_on_terminal([sys.executable, "-m", "jobcore.cli", "list"], _env(uri))
        assert job in shown, shown  # whole, on one line: a copied UUID works
        assert "…" not in shown
    finally:
        jobctl(uri, "abort", job)


def test_closed_stdout_is_quiet_exit_141(jobd: Jobd, tmp_path: Path) -> None:
    uri, job = _slow_job(jobd, tmp_path)
    try:
        # `jobctl events | head -n 1`: the reader goes away while events keep coming
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobcore.cli", "events", "--job", job],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(uri),
            cwd=ROOT,
        )
        assert proc.stdout is not None and proc.stderr is not None
        assert job in proc.stdout.readline().decode()
        proc.stdout.close()
        assert proc.wait(30) == ExitCode.BROKEN_PIPE and ExitCode.BROKEN_PIPE.value == 141
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert "Error" not in err and "Traceback" not in err, err
        # `jobctl domains | true`: the reader is gone before the first write
        read_end, write_end = os.pipe()
        os.close(read_end)
        done = subprocess.run(
            [sys.executable, "-m", "jobcore.cli", "domains"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=_env(uri),
            cwd=ROOT,
            check=False,
            timeout=30,
        )
        os.close(write_end)
        assert (done.returncode, done.stderr) == (141, b"")
    finally:
        jobctl(uri, "abort", job)


def test_wait_timeout_names_job_duration_and_state(jobd: Jobd, tmp_path: Path) -> None:
    uri, job = _slow_job(jobd, tmp_path)
    try:
        waited = jobctl(uri, "wait", "--timeout", "1", "--json", job)
        assert waited.returncode == ExitCode.TIMEOUT and ExitCode.TIMEOUT.value == 10
        assert waited.stderr == (
            f"jobctl: error: job {job} did not end within 1 s (state: running)\n"
        )
        plain = jobctl(uri, "wait", "--timeout", "0.5", job)  # progress lines, then the reason
        assert plain.returncode == ExitCode.TIMEOUT
        assert plain.stderr.splitlines()[-1] == (
            f"jobctl: error: job {job} did not end within 0.5 s (state: running)"
        )
    finally:
        jobctl(uri, "abort", job)


def test_events_for_an_unknown_domain_fail_at_once(jobd: Jobd) -> None:
    started = time.monotonic()
    watched = jobctl(jobd.uri(), "events", "--domain", "nosuchvm", timeout=20)
    assert watched.returncode == ExitCode.NOT_FOUND
    assert "domain 'nosuchvm' not found" in watched.stderr
    assert time.monotonic() - started < 10


def test_version() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "jobcore.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert shown.stdout == f"jobctl, version {importlib.metadata.version('jobcore')}\n"
    jobd = subprocess.run(
        [sys.executable, "-m", "jobcore.daemon", "--version"], capture_output=True, text=True
    )
    assert jobd.stdout == f"jobd, version {importlib.metadata.version('jobcore')}\n"


def test_list_loads_neither_the_daemon_nor_the_progress_bar(jobd: Jobd) -> None:
    """A remote `jobctl list` imports the commands it runs, not jobd or rich's progress."""
    daemon_module = start_from_options.__module__  # where `jobctl daemon` gets jobd from
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from jobcore.cli import main\n"
        f"done = CliRunner().invoke(main, ['-c', {jobd.uri()!r}, 'list', '--all'])\n"
        "assert done.exit_code == 0, done.output\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert loaded.returncode == 0, loaded.stderr
    modules = set(loaded.stdout.split())
    assert "jobcore.cli.commands.jobs" in modules  # what `list` needs is there
    assert daemon_module not in modules
    assert "jobcore.cli.commands.daemon" not in modules
    assert "rich.progress" not in modules


#: what an in-process connection needs and a jobd client does not: the engine, the job
#: stores, the drivers and the blocking facade
LOCAL_ONLY = ("jobcore.engine", "jobcore.local", "jobcore.store_sqlite", "jobcore.facade")


def test_a_remote_list_does_not_load_the_engine(jobd: Jobd) -> None:
    """`jobctl -c DRIVER+unix://… list` talks to jobd: `import jobcore` and
    `jobcore.connect` of a `+unix` URI load jobcore.remote, never the engine or a driver."""
    script = (
        "import sys\n"
        "from jobcore.cli.app import main\n"
        f"sys.argv = ['jobctl', '-c', {jobd.uri()!r}, 'list', '--all']\n"
        "try:\n"
        "    main(prog_name='jobctl')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert loaded.returncode == 0, loaded.stderr
    modules = set(loaded.stderr.split())
    assert "jobcore.remote" in modules  # it did talk to jobd
    assert not modules & {*LOCAL_ONLY, "drivers.sim", "drivers.qemu"}, modules & {*LOCAL_ONLY}


#: what a remote `jobctl list` piped to a file does not need: structlog (its dev renderer
#: pulls rich and asyncio) while nothing logs, rich while nothing renders on a terminal,
#: and the XML layer (lxml, the job type registry) while no XML is read or written
REMOTE_LIST_NEEDS_NOT = ("structlog", "rich", "lxml", "jobcore.xml", "jobcore.registry")


def test_a_remote_list_loads_no_logging_renderer_rich_or_xml(jobd: Jobd, tmp_path: Path) -> None:
    """`jobctl -c DRIVER+unix://… list > file` imports only what it runs (issue 14)."""
    script = (
        "import sys\n"
        "from jobcore.cli.app import main\n"
        f"sys.argv = ['jobctl', '-c', {jobd.uri()!r}, 'list', '--all']\n"
        "try:\n"
        "    main(prog_name='jobctl')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    begun = jobctl(
        jobd.uri(), "begin", "vm1", write(tmp_path, "b.xml", BACKUP_VDB.format(tag="il"))
    )
    assert begun.returncode == 0, begun.stderr  # a row to render
    loaded = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")},
    )
    assert loaded.returncode == 0, loaded.stderr
    assert begun.stdout.strip() in loaded.stdout  # the row was printed
    modules = set(loaded.stderr.split())
    assert "jobcore.remote" in modules
    heavy = {m for m in modules if m.split(".")[0] in REMOTE_LIST_NEEDS_NOT}
    heavy |= {m for m in modules if m.startswith(REMOTE_LIST_NEEDS_NOT[3:])}
    assert not heavy, sorted(heavy)


#: what the event loop brings: a remote command that needs no events starts none
EVENT_LOOP = ("anyio", "asyncio", "sniffio", "trio")


@pytest.mark.parametrize(
    ("tag", "command"),
    [("nl1", ["list", "--all"]), ("nl2", ["list", "--json"]), ("nl3", ["domains"])],
)
def test_a_remote_command_without_events_runs_no_event_loop(
    jobd: Jobd, tmp_path: Path, tag: str, command: list[str]
) -> None:
    """A remote `jobctl list` (or any command needing no events) runs on the loop-free
    blocking client (design/daemon.md "Starting at once"): no anyio, no asyncio, no thread."""
    uri = jobd.uri("rate=1048576")  # as _slow_job's (the module's jobd opens sim once)
    begun = jobctl(uri, "begin", "vm1", write(tmp_path, "b.xml", BACKUP_VDB.format(tag=tag)))
    assert begun.returncode == 0, begun.stderr
    script = (
        "import sys, threading\n"
        "from jobcore.cli.app import main\n"
        f"sys.argv = ['jobctl', '-c', {uri!r}, *{command!r}]\n"
        "try:\n"
        "    main(prog_name='jobctl')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print(threading.active_count(), *sorted(sys.modules), file=sys.stderr)\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert loaded.returncode == 0, loaded.stderr
    threads, *modules = loaded.stderr.split()
    assert "jobcore.remote" in modules  # it did talk to jobd
    if command[0] == "list":
        assert begun.stdout.strip() in loaded.stdout
    else:
        assert "vm1" in loaded.stdout
    assert sorted(m for m in modules if m.split(".")[0] in EVENT_LOOP) == []
    assert threads == "1"


#: what a running job's row changes between two calls
MOVING = ("processed", "progress", "time_elapsed")


def _both_ways(monkeypatch: pytest.MonkeyPatch, uri: str, *args: str) -> list[tuple[int, str]]:
    """``jobctl ARGS`` on the blocking client, then on the event loop's async client."""
    from click.testing import CliRunner

    from jobcore.cli import session

    runs = []
    for way in (session._on_blocking_client, session._on_event_loop):
        monkeypatch.setattr(session, "_on_blocking_client", way)
        done = CliRunner().invoke(main, ["-c", uri, *args])
        runs.append((done.exit_code, done.output))
    return runs


def test_the_blocking_client_answers_as_the_event_loop_does(
    jobd: Jobd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every remote command that runs without a loop prints and exits as it did on one."""
    uri, job = _slow_job(jobd, tmp_path)
    cases = [
        ["domains", "--json"],
        ["dumpxml", job],
        ["explain", job, "--json"],
        ["checkpoint", "list", "vm1"],
        ["info", "ffffffff"],  # no such job: exit 7 and its message
        ["info", "nonsense"],  # not a UUID: exit 2
        ["group", "info", "00000000-0000-0000-0000-000000000000"],
        ["set-speed", job, "2M"],
        ["hosts"],  # not a fleet: refused the same way
    ]
    for args in cases:
        blocking, looped = _both_ways(monkeypatch, uri, *args)
        assert blocking == looped, args
    listed = [
        (code, [{k: v for k, v in row.items() if k not in MOVING} for row in json.loads(out)])
        for code, out in _both_ways(monkeypatch, uri, "list", "--json")
    ]
    assert listed[0] == listed[1] and listed[0][1], listed
    assert any(row["uuid"] == job for row in listed[0][1])
    aborted = _both_ways(monkeypatch, uri, "abort", job)
    assert aborted[0][0] == 0 and aborted[1][0] != 0  # the second finds it ended
    assert aborted[1] == _both_ways(monkeypatch, uri, "abort", job)[0]


def test_jobcore_imports_its_api_on_first_use() -> None:
    """`import jobcore` is light (`jobctl --version`); every public name still resolves,
    `dir(jobcore)` lists them, and `from jobcore import X` works."""
    script = (
        "import sys, jobcore\n"
        f"light = not any(m in sys.modules for m in {LOCAL_ONLY!r})\n"
        "names = set(dir(jobcore))\n"
        "from jobcore import BackupJobSpec, JobState, connect, open\n"
        "assert all(getattr(jobcore, n) is not None for n in jobcore.__all__)\n"
        "assert set(jobcore.__all__) <= names, set(jobcore.__all__) - names\n"
        "assert jobcore.local.LocalConnection\n"  # a submodule, on first use
        "print(light)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "True\n"


def test_command_table_names_every_command_once() -> None:
    """`COMMANDS` (what the root group lists and loads) is exactly the commands defined."""
    defined: dict[str, str] = {}
    for module in set(COMMANDS.values()):
        loaded = importlib.import_module(f"jobcore.cli.commands.{module}")
        commands = [v for v in vars(loaded).values() if isinstance(v, click.Command)]
        nested = {
            id(c) for g in commands if isinstance(g, click.Group) for c in g.commands.values()
        }
        for command in commands:
            if id(command) not in nested:  # `domain create` is the `domain` group's
                defined[str(command.name)] = module
    assert defined == COMMANDS
    with click.Context(main) as ctx:
        loaded_names = [getattr(main.get_command(ctx, name), "name", None) for name in COMMANDS]
    assert loaded_names == list(COMMANDS)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("1048576", MiB),
        ("512B", 512),
        ("100MiB", 100 * MiB),
        ("100M", 100 * MiB),
        ("100mib/s", 100 * MiB),
        ("100MB", 100_000_000),
        ("2k", 2048),
        ("3KiB/s", 3072),
        ("1G", 1 << 30),
        ("1GB/s", 10**9),
        ("2T", 2 << 40),
    ],
)
def test_bandwidth_units_as_libvirt(text: str, value: int) -> None:
    assert parse_bandwidth(text) == value


@pytest.mark.parametrize("text", ["", "fast", "1.5M", "-1", "10Mbit", "10 MiB/h", "9" * 30])
def test_bad_bandwidth_is_refused_with_the_units(text: str) -> None:
    with pytest.raises(ValueError, match=r"MiB|too large"):
        parse_bandwidth(text)


def test_set_speed(jobd: Jobd, tmp_path: Path) -> None:
    uri, job = _slow_job(jobd, tmp_path)
    try:
        done = jobctl(uri, "set-speed", job[:8], "100MiB")
        assert (done.returncode, done.stdout) == (0, f"{job}: bandwidth 100.000 MiB/s\n")
        assert json.loads(jobctl(uri, "info", job, "--json").stdout)["bandwidth"] == 100 * MiB
        assert jobctl(uri, "set-speed", job, "0").stdout == f"{job}: bandwidth unlimited\n"
        bad = jobctl(uri, "set-speed", job, "lots")
        assert bad.returncode == ExitCode.USAGE and "KiB, MiB" in bad.stderr
    finally:
        jobctl(uri, "abort", job)


@pytest.mark.qemu
def test_domain_create_and_destroy_through_jobd(tmp_path: Path) -> None:
    qemu_dir = tmp_path / "qemu"
    daemon = Jobd(tmp_path / "run", "--allow-uri", f"qemu:///session?dir={qemu_dir}").wait_ready()
    try:
        uri = f"qemu+unix:///session?socket={daemon.sock}&dir={qemu_dir}"
        disk = create(tmp_path / "vda.qcow2")
        xml = write(tmp_path, "dom.xml", domain_xml("cli1", {"vda": disk}))
        made = jobctl(uri, "domain", "create", xml, timeout=60)
        assert (made.returncode, made.stdout) == (0, f"Domain 'cli1' created from {xml}\n")
        listed = json.loads(jobctl(uri, "domains", "--json").stdout)
        assert [(d["name"], d["running"]) for d in listed] == [("cli1", True)]
        pidfiles = list((tmp_path / "qemu").glob("*.pid"))
        assert pidfiles
        pid = int(pidfiles[0].read_text())
        gone = jobctl(uri, "domain", "destroy", "cli1", timeout=60)
        assert (gone.returncode, gone.stdout) == (0, "Domain 'cli1' destroyed\n")
        assert json.loads(jobctl(uri, "domains", "--json").stdout) == []
        assert not Path(f"/proc/{pid}").exists() or "zombie" in _status(pid)
        again = jobctl(uri, "domain", "destroy", "cli1")
        assert again.returncode == ExitCode.NOT_FOUND, again.stderr
        ro = uri.replace(str(daemon.sock), str(daemon.ro_sock))
        assert jobctl(ro, "domain", "create", xml).returncode == ExitCode.DENIED
    finally:
        daemon.stop()


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "zombie"


def _complete(uri: str, *words: str) -> list[str]:
    env = _env(uri)
    env.update(
        _JOBCTL_COMPLETE="bash_complete",
        COMP_WORDS=" ".join(["jobctl", *words]),
        COMP_CWORD=str(len(words)),
    )
    done = subprocess.run(
        [str(JOBCTL)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=30, check=True
    )
    return [line for line in done.stdout.splitlines() if line]


def test_shell_completion_script_and_live_names(jobd: Jobd, tmp_path: Path) -> None:
    for shell, marker in (("bash", "complete -o nosort -F _jobctl_completion jobctl"),
                          ("zsh", "compdef _jobctl_completion jobctl"),
                          ("fish", "complete --no-files --command jobctl")):  # fmt: skip
        env = {**os.environ, "_JOBCTL_COMPLETE": f"{shell}_source"}
        script = subprocess.run(
            [str(JOBCTL)], capture_output=True, text=True, env=env, check=True, timeout=30
        ).stdout
        assert marker in script, script
    uri, job = _slow_job(jobd, tmp_path)
    try:
        assert f"plain,{job}" in _complete(uri, "abort", "")
        assert _complete(uri, "abort", job[:6]) == [f"plain,{job}"]
        assert _complete(uri, "begin", "") == ["plain,vm1", "plain,vm2"]
        assert _complete(uri, "events", "--domain", "vm") == ["plain,vm1", "plain,vm2"]
        assert _complete(uri, "info", "--legacy", "vm2") == ["plain,vm2"]
        began = jobctl(uri, "begin", "vm2", write(tmp_path, "b.xml", BACKUP_VDB.format(tag="cc")))
        other = began.stdout.strip()
        assert f"plain,{other}" in _complete(uri, "set-speed", "")
        jobctl(uri, "abort", other)
        gone = f"sim+unix:///default?socket={tmp_path}/none.sock"
        assert _complete(gone, "abort", "") == []  # no daemon: no names, no noise
    finally:
        jobctl(uri, "abort", job)


def test_begin_reuse_external(jobd: Jobd, tmp_path: Path) -> None:
    image = tmp_path / "kept.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "512M"], check=True)
    before = image.read_bytes()
    uri = jobd.uri("rate=1048576")
    xml = write(tmp_path, "b.xml", BACKUP_VDB.replace("/b/{tag}-vdb.qcow2", str(image)))
    refused = jobctl(uri, "begin", "vm2", xml)
    assert refused.returncode != 0
    assert f"store '{image}' for backup of 'vdb' exists" in refused.stderr
    assert "REUSE_EXTERNAL" in refused.stderr
    assert image.read_bytes() == before
    began = jobctl(uri, "begin", "--reuse-external", "vm2", xml)
    assert began.returncode == 0, began.stderr
    job = began.stdout.strip()
    assert json.loads(jobctl(uri, "info", job, "--json").stdout)["state"] == "running"
    assert jobctl(uri, "abort", job).returncode == 0
    assert image.exists()  # a reused file is never removed
