"""jobctl's fast start (jobcore.cli.fast, issue 14): a remote `jobctl list` answered without
click, attrs or cattrs prints the same bytes and exits the same way as the click command,
reads the option declarations click's commands are built from, and leaves every other
command line (and every surprise) to the click command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import attrs
import click
import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jobd_helpers import BACKUP_VDB, PULL_VDA, ROOT, Jobd, jobctl, write

from jobcore import protocol, remote, rundir, urisplit
from jobcore.cli import declare, fast, session
from jobcore.cli.app import main as group
from jobcore.cli.commands.jobs import list_
from jobcore.errors import InvalidURI
from jobcore.info import JobInfo
from jobcore.lifecycle import JobState
from jobcore.methods import Arg, Method, On
from jobcore.spec import JobType

#: the click command alone, never the fast start: what the fast start must equal
CLICK_ONLY = "from jobcore.cli.app import main\nmain(prog_name='jobctl')\n"
#: the fast start, then the modules it loaded (on stderr, after what it printed)
FAST_MODULES = (
    "from jobcore.cli.fast import main\n"
    "try:\n"
    "    main(prog_name='jobctl')\n"
    "except SystemExit as exc:\n"
    "    assert not exc.code, exc.code\n"
    "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n"
)


@pytest.fixture(scope="module")
def jobd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobd]:
    daemon = Jobd(tmp_path_factory.mktemp("fast") / "run").wait_ready()
    try:
        yield daemon
    finally:
        daemon.stop()


def _run(code: str | None, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``jobctl ARGS`` through ``python -m jobcore.cli`` (code None: the fast start) or
    through ``code`` (which finds ARGS in sys.argv[1:]); its status, stdout and stderr."""
    shifted = f"import sys\nsys.argv = sys.argv[1:]\n{code}"
    argv = (
        [sys.executable, "-m", "jobcore.cli"] if code is None else [sys.executable, "-c", shifted]
    )
    full = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    full.pop("JOBCORE_URI", None)
    done = subprocess.run(
        [*argv, *args] if code is None else [*argv, "jobctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**full, **(env or {})},
        cwd=ROOT,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def _click(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    return _run(CLICK_ONLY, *args, env=env)


@pytest.fixture(scope="module")
def ended(jobd: Jobd, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A URI whose domains hold ended jobs only (rows that do not move): vm1 two completed
    backups, vm2 a completed pull."""
    tmp = tmp_path_factory.mktemp("ended")
    uri = jobd.uri(host="ended")
    jobs = [
        ("vm1", BACKUP_VDB.format(tag="e1")),
        ("vm2", PULL_VDA),
        ("vm1", BACKUP_VDB.format(tag="e2")),
    ]
    for n, (dom, xml) in enumerate(jobs):
        done = jobctl(uri, "begin", dom, write(tmp, f"{n}.xml", xml), "--wait")
        assert done.returncode == 0, done.stderr
    return uri


@pytest.mark.parametrize(
    "args",
    [
        ["list", "--all"],
        ["list", "-a", "--json"],
        ["list", "--json", "--all", "--domain", "vm2"],
        ["list", "--all", "-dvm1"],
        ["list", "--domain=vm1", "--all", "--all"],
        ["list", "--domain", "vm9", "--all", "--domain", "vm1"],  # the last one counts
        ["list"],  # nothing active: the note on stderr
        ["list", "--json"],
        ["list", "--domain", "", "-a"],  # an empty domain: every domain listed, none kept
    ],
)
def test_the_fast_start_prints_what_the_click_command_prints(
    jobd: Jobd, ended: str, args: list[str]
) -> None:
    fast_run = _run(None, "-c", ended, *args)
    assert fast_run == _click("-c", ended, *args)
    assert fast_run[0] == 0
    if ("--all" in args or "-a" in args) and "" not in args:
        assert fast_run[1].count("\n") >= 1


def test_the_fast_start_answers_without_click_attrs_or_cattrs(jobd: Jobd, ended: str) -> None:
    """The fast start did answer (so the comparisons above compare two ways)."""
    for args in (["-c", ended, "list", "--all"], ["--connect", ended, "list", "--json", "-a"]):
        status, out, err = _run(FAST_MODULES, *args)
        assert status == 0, err
        modules = set(err.split())
        assert out == _click(*args)[1]
        heavy = {m.split(".")[0] for m in modules} & {"click", "attrs", "attr", "cattrs"}
        assert not heavy, heavy
        assert "jobcore.remote" not in modules and "jobcore.protocol" not in modules
    status, out, err = _run(FAST_MODULES, "list", "--all", env={"JOBCORE_URI": ended})
    assert (
        status == 0 and "click" not in err.split() and out == _click("-c", ended, "list", "-a")[1]
    )


@pytest.mark.parametrize("force", ["FORCE_COLOR", "TTY_COMPATIBLE"])
def test_on_a_terminal_the_fast_start_draws_the_click_commands_table(
    ended: str, force: str
) -> None:
    """Where rich finds a terminal, the fast start draws the same rich table, bytes for
    bytes, loading rich (once the answer is in) but not click."""
    env = {force: "1", "COLUMNS": "160"}
    fast_run = _run(None, "-c", ended, "list", "--all", env=env)
    assert fast_run == _click("-c", ended, "list", "--all", env=env)
    status, out, _err = fast_run
    assert status == 0 and "\x1b[" in out and "UUID" in out  # rich's bold header
    status, out, err = _run(FAST_MODULES, "-c", ended, "list", "--all", env=env)
    modules = set(err.split())
    assert status == 0 and out == fast_run[1]
    assert "rich.table" in modules and "click" not in modules and "cattrs" not in modules


def test_a_running_job_is_listed_the_same_way(jobd: Jobd, tmp_path: Path) -> None:
    uri = jobd.uri("rate=1048576", host="moving")
    began = jobctl(uri, "begin", "vm1", write(tmp_path, "b.xml", BACKUP_VDB.format(tag="mv")))
    assert began.returncode == 0, began.stderr
    moving = ("processed", "progress", "time_elapsed")
    rows = []
    for way in (_run, lambda _code, *a: _click(*a)):
        status, out, _ = way(None, "-c", uri, "list", "--json")
        assert status == 0
        rows.append([{k: v for k, v in r.items() if k not in moving} for r in json.loads(out)])
    assert rows[0] == rows[1] and rows[0][0]["uuid"] == began.stdout.strip()


@pytest.mark.parametrize(
    "args",
    [
        ["list", "--domain", "nosuchvm"],  # an error reply: exit 7 and its message
        ["list", "--fleet"],  # not a fleet member
        ["list", "--bogus"],  # a usage error
        ["list", "extra"],
        ["--help"],
        ["list", "--help"],
        ["-c"],
    ],
)
def test_what_the_fast_start_leaves_to_click_ends_as_before(
    jobd: Jobd, ended: str, args: list[str]
) -> None:
    full = ["-c", ended, *args] if args != ["-c"] else args
    fast_run = _run(None, *full)
    assert fast_run == _click(*full)
    assert fast_run[0] != 0 or "--help" in args


def test_the_default_daemon_is_listed_as_before(tmp_path: Path) -> None:
    """No -c: the default run directory's jobd (XDG_RUNTIME_DIR/jobcore here), reached by
    the fast start; a plain sim:///default too; with none running, the embedded one."""
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    assert _run(None, "list", "--all", env=env) == _click("list", "--all", env=env)
    with Jobd(runtime / "jobcore", env=env).wait_ready() as daemon:
        began = jobctl(daemon.uri(), "begin", "vm2", write(tmp_path, "p.xml", PULL_VDA), "--wait")
        assert began.returncode == 0, began.stderr
        for args in (["list", "-a"], ["-c", "sim:///default", "list", "-a", "--json"]):
            status, out, err = _run(FAST_MODULES, *args, env=env)
            assert status == 0 and began.stdout.strip() in out, err
            assert "click" not in err.split()
            assert (status, out) == _click(*args, env=env)[:2]


def test_an_unreachable_daemon_ends_as_before(tmp_path: Path) -> None:
    uri = f"sim+unix:///default?socket={tmp_path}/none.sock"
    fast_run = _run(None, "-c", uri, "list")
    assert fast_run == _click("-c", uri, "list")
    assert fast_run[0] == 6 and "cannot reach" in fast_run[2]


def test_the_fast_start_reads_what_the_protocol_declares() -> None:
    """Each protocol fact the fast start carries is the one jobcore declares."""
    assert fast.PROTOCOL_VERSION == protocol.PROTOCOL_VERSION
    assert fast.MAX_FRAME == protocol.MAX_FRAME
    assert fast.LIST_PAGE == remote.LIST_PAGE
    assert fast.RW_SOCKET == protocol.RW_SOCKET
    assert fast.JOB_STATES == {str(s) for s in JobState}
    assert fast.ENDED == {str(s) for s in JobState if s.terminal}
    assert fast.DAEMON_DRIVERS == protocol.DAEMON_DRIVERS
    assert fast.EMBEDDED_URI == session.EMBEDDED_URI
    assert rundir.user_run_dir(fast.RUN_DIR) == protocol.default_run_dir()
    calls = {
        fast.HELLO: (Method.HELLO, On.SESSION, (Arg.INT, Arg.STR)),
        fast.LIST_DOMAINS: (Method.LIST_DOMAINS, On.CONNECTION, ()),
        fast.LOOKUP_DOMAIN: (Method.LOOKUP_DOMAIN, On.CONNECTION, (Arg.STR,)),
        fast.LIST_JOBS_PAGE: (Method.LIST_JOBS_PAGE, On.DOMAIN, (Arg.STR, Arg.INT, Arg.INT)),
        fast.JOB_INFO: (Method.JOB_INFO, On.JOB, (Arg.UUID,)),
    }
    for name, (method, on, wire_args) in calls.items():
        assert (method.value.name, method.value.on, method.value.wire_args) == (name, on, wire_args)
    assert [name for name, _ in fast.JOB_INFO_FIELDS] == [f.name for f in attrs.fields(JobInfo)]


def test_click_reads_the_declarations_the_fast_start_parses() -> None:
    """`list`'s options and the root group's -c are the declarations' (one of each)."""
    assert [o.opts + o.secondary_opts for o in list_.params] == [
        [d for d in o.decls if d.startswith("-")] for o in declare.LIST
    ]
    assert [o.name for o in list_.params] == [o.dest for o in declare.LIST]
    assert [o.help for o in list_.params] == [o.help for o in declare.LIST]
    (connect,) = [p for p in group.params if p.name == declare.CONNECT.dest]
    assert isinstance(connect, click.Option)
    assert connect.opts == list(declare.CONNECT.spellings)
    assert connect.envvar == declare.CONNECT.envvar


_ROOT_TOKENS = st.sampled_from(
    [
        "-c",
        "--connect",
        "--connect=sim+unix:///d?socket=/s",
        "-csim+unix:///e?socket=/t",
        "sim+unix:///d?socket=/s",
        "-h",
    ]
)
_LIST_TOKENS = st.sampled_from(
    ["-c", "-a", "--all", "--json", "-d", "--domain", "--domain=vm1", "-dvm2", "vm1", "",
     "--fleet", "--", "-h", "--all=1", "-ad", "--jso", "list"]
)  # fmt: skip


@given(st.lists(_ROOT_TOKENS, max_size=3), st.lists(_LIST_TOKENS, max_size=6))
def test_the_fast_parse_agrees_with_click(root_args: list[str], list_args: list[str]) -> None:
    """Where the fast start parses a command line, click parses it into the same values;
    where click refuses one, the fast start does not answer it."""
    argv = [*root_args, "list", *list_args]
    try:
        mine = fast._parse(argv)
    except fast._NotHere:
        return
    try:
        theirs = _click_parse(argv)
    except click.UsageError as exc:
        raise AssertionError(f"click refuses {argv}: {exc}") from None
    assert mine == theirs


def _click_parse(argv: list[str]) -> dict[str, object]:
    """The root group's and `list`'s parameters as click parses ``argv``."""
    env = os.environ.pop("JOBCORE_URI", None)
    try:
        root = group.make_context("jobctl", list(argv))
        with warnings.catch_warnings():  # click 8.2 deprecates protected_args
            warnings.simplefilter("ignore", DeprecationWarning)
            rest = [*root.protected_args, *root.args]
        assert rest[0] == "list"
        return {**root.params, **list_.make_context("list", rest[1:], parent=root).params}
    finally:
        if env is not None:
            os.environ["JOBCORE_URI"] = env


@pytest.mark.parametrize(
    "argv",
    [
        ["-c", "U", "list", "--all", "-dvm1", "--json"],
        ["--connect=U", "list", "--domain=", "-a", "-a"],
        ["-cU", "--connect", "V", "list", "-d", "x", "--domain", "y"],
    ],
)
def test_the_fast_parse_answers_these(argv: list[str]) -> None:
    """The property above compares something: these parse (as click parses them)."""
    assert fast._parse(argv) == _click_parse(argv)


_INFOS = st.builds(
    JobInfo,
    uuid=st.uuids(),
    type=st.sampled_from([JobType.BACKUP, JobType.BLOCKPULL, JobType("x")]),
    domain=st.text(max_size=8),
    state=st.sampled_from(list(JobState)),
    processed=st.integers(0, 2**63),
    total=st.integers(-1, 2**63),
    time_elapsed=st.integers(0, 2**40),
    created=st.floats(allow_nan=False, allow_infinity=False),
    started=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    ended=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    errmsg=st.none() | st.text(max_size=8),
    bandwidth=st.none() | st.integers(0, 2**63),
    host=st.text(max_size=8),
    host_lost=st.booleans(),
)


@given(_INFOS)
def test_the_lean_decoder_reads_a_job_info_as_the_protocol_does(info: JobInfo) -> None:
    wire = msgpack.unpackb(msgpack.packb(protocol.encode_value(info), use_bin_type=True))
    typed = protocol.decode_result(Method.JOB_INFO, wire)
    assert fast._job_info(wire) == typed.as_dict() == info.as_dict()
    assert list(fast._job_info(wire)) == list(info.as_dict())
    assert fast._uuid_text(info.uuid.bytes) == str(info.uuid)


@given(_INFOS, st.integers(0, 13), st.sampled_from([None, True, 1, 1.5, "x", b"y", [], {}]))
def test_the_lean_decoder_refuses_what_the_protocol_refuses(
    info: JobInfo, index: int, value: object
) -> None:
    """A wire JobInfo with one field changed: both accept it (and agree) or both refuse."""
    wire = msgpack.unpackb(msgpack.packb(protocol.encode_value(info), use_bin_type=True))
    wire[index] = value
    try:
        typed = protocol.decode_result(Method.JOB_INFO, wire).as_dict()
    except ValueError:
        typed = None
    try:
        lean = fast._job_info(wire)
    except (fast._NotHere, ValueError, TypeError):
        lean = None
    assert lean == typed


def test_uuid_text_is_uuids() -> None:
    u = uuid.uuid4()
    assert fast._uuid_text(u.bytes) == str(u)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_pages_and_batches_give_the_same_list(
    ended: str, batch: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One job per page, a few requests per batch: the same rows as the click command."""
    monkeypatch.setattr(fast, "LIST_PAGE", 1)
    monkeypatch.setattr(fast._Client, "BATCH", batch)
    for args in (["list", "--all"], ["list", "--all", "--json"]):
        monkeypatch.setattr(sys, "argv", ["jobctl", "-c", ended, *args])
        assert fast._fast(sys.argv[1:]) == 0
        out = capsys.readouterr().out
        assert out.count("\n") == (1 if "--json" in args else 4)
        assert out == _click("-c", ended, *args)[1]


_SCHEMES = st.sampled_from(
    ["sim", "sim+unix", "qemu+unix", "a1", "Sim", "s+", "+u", "s+u+v", "1s", "s-u", ""]
)
_URIS = st.builds(
    "{}://{}{}{}".format,
    _SCHEMES,
    st.text(alphabet="ab.-_~:@[", max_size=4),
    st.text(alphabet="ab/.-%~ :", max_size=10),
    st.lists(st.text(alphabet="ab/=+%-.~ #;", max_size=6), max_size=3).map(
        lambda pairs: ("?" + "&".join(pairs)) if pairs else ""
    ),
)  # fmt: skip


@given(_URIS | st.text(alphabet="ab09_.-~/:+?=&%# \t;[]@S", max_size=30))
def test_the_plain_split_is_urllibs(text: str) -> None:
    """A URI split without urllib has the parts urllib's split gives it (and is a URI)."""
    plain = urisplit._split_plain(text)
    try:
        full: object = urisplit._split(text)
    except (InvalidURI, ValueError):  # urlsplit's own ValueError ('sim://['): not a URI
        full = None
    if plain is not None:
        assert plain == full


_KEYS = st.sampled_from(["socket", "rate"]) | st.text("ab/%+ ~._-=", max_size=4)


@given(st.lists(st.tuples(_KEYS, st.text("ab/%+ ~._-", max_size=4))))
def test_the_plain_driver_uri_is_urlencodes(params: list[tuple[str, str]]) -> None:
    kept = [(k, v) for k, v in params if k != "socket"]
    query = urllib.parse.urlencode(kept)
    expected = "sim://h/p" + (f"?{query}" if query else "")
    assert urisplit.driver_uri("sim", "h", "/p", tuple(params)) == expected


def test_a_socket_uri_is_split_without_urllib() -> None:
    text = "sim+unix:///default?socket=/tmp/pytest-of-x/run-1/jobd.sock&rate=1048576"
    assert urisplit._split_plain(text) == urisplit._split(text)
    assert urisplit._split_plain(text) is not None
