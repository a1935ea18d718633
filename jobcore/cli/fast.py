"""jobctl's fast start (the ``jobctl`` script, ``python -m jobcore.cli``): a remote
``jobctl -c DRIVER+unix:///…?socket=… list [--all] [--json] [--domain NAME]`` is
answered without click, attrs, cattrs or jobcore.remote (rich only to draw its table on
a terminal, once the answer is in), from the option declarations click's commands are
built from (jobcore.cli.declare). Every other command line, and this one wherever
anything is not as expected (no daemon, an error reply, an odd value), runs the click
command as before, which then does
everything again and reports what it finds: the fast start prints only once it holds a
whole answer, the same bytes as the click command prints (tests/test_jobctl_fast.py
compares them). design/daemon.md "Starting at once".
"""

from __future__ import annotations

import os
import sys

from jobcore.cli import declare
from jobcore.cli.plain import (
    broken_pipe,
    job_lines,
    may_be_terminal,
    rich_jobs_table,
    terminal_console,
)
from jobcore.errors import JobError
from jobcore.urisplit import driver_uri, split_uri

TYPE_CHECKING = False  # typing is not loaded for this
if TYPE_CHECKING:
    from typing import Any

# What the fast start reads of the jobd protocol; tests/test_jobctl_fast.py checks each
# against its one declaration (jobcore.protocol, jobcore.methods, jobcore.remote).
PROTOCOL_VERSION = 2
MAX_FRAME = 4 << 20
LIST_PAGE = 1000
HELLO, LIST_DOMAINS, LOOKUP_DOMAIN = "hello", "list_domains", "lookup_domain"
LIST_JOBS_PAGE, JOB_INFO = "list_jobs_page", "job_info"
#: JobState's values, and those of its ended states (jobcore.lifecycle: enum costs more
#: of a start than the rest of this module)
JOB_STATES = frozenset(
    {"queued", "running", "paused", "ready", "standby", "completing", "aborting"}
    | {"completed", "failed", "cancelled"}
)
ENDED = frozenset({"completed", "failed", "cancelled"})
RUN_DIR, RW_SOCKET = "jobcore", "jobd.sock"
DAEMON_DRIVERS = ("qemu", "sim")
#: jobctl's connection without -c and $JOBCORE_URI (jobcore.cli.session.EMBEDDED_URI)
EMBEDDED_URI = "sim:///default"
#: seconds any one reply may take before the click command is left to deal with it
REPLY_TIMEOUT = 30.0
#: exit status of an interrupted command (jobcore.cli.errors.ExitCode.INTERRUPTED)
INTERRUPTED = 130


class _NotHere(Exception):
    """The fast start does not answer this one: the click command does."""


def main(prog_name: str | None = None) -> None:
    """The ``jobctl`` command: the fast start where it answers, else the click group."""
    try:
        status = _fast(sys.argv[1:])
    except KeyboardInterrupt:
        status = INTERRUPTED
    if status is not None:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            broken_pipe()
        sys.exit(status)
    from jobcore.cli.app import main as group

    group(prog_name=prog_name)


def _fast(argv: list[str]) -> int | None:
    """The exit status of a command line the fast start answered, else None."""
    try:
        opts = _parse(argv)
        lines, to_stderr = _list(opts)
    except (
        _NotHere,
        OSError,
        JobError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
    ):
        return None
    text = "".join(f"{line}\n" for line in lines)
    if not text.isascii() or "\x1b" in text:  # click.echo's own handling: leave it to click
        return None
    try:
        (sys.stderr if to_stderr else sys.stdout).write(text)
    except BrokenPipeError:
        broken_pipe()
    return 0


def _value(argv: list[str], i: int, opt: declare.Opt) -> tuple[str, int] | None:
    """The value of ``opt`` at ``argv[i]`` (``-cV``, ``--connect=V``, ``-c V``) and the
    next index; None if ``argv[i]`` is no spelling of it."""
    arg = argv[i]
    for spelling in opt.spellings:
        if arg == spelling:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise _NotHere
            return argv[i + 1], i + 2
        if spelling.startswith("--") and arg.startswith(spelling + "="):
            return arg[len(spelling) + 1 :], i + 1
        if not spelling.startswith("--") and arg.startswith(spelling) and len(arg) > 2:
            return arg[2:], i + 1
    return None


def _parse(argv: list[str]) -> dict[str, object]:
    """``-c URI list [options]`` parsed as click would, or _NotHere."""
    if any(k.startswith("_") and k.endswith("_COMPLETE") for k in os.environ):
        raise _NotHere  # shell completion: click's
    opts: dict[str, object] = {declare.CONNECT.dest: None}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        got = _value(argv, i, declare.CONNECT)
        if got is None:
            raise _NotHere  # --help, --version, anything else
        opts[declare.CONNECT.dest], i = got
    if argv[i : i + 1] != ["list"]:
        raise _NotHere
    i += 1
    for opt in declare.LIST:
        opts[opt.dest] = False if opt.flag else None
    while i < len(argv):
        for opt in declare.LIST:
            if opt.flag and argv[i] in opt.spellings:
                opts[opt.dest], i = True, i + 1
                break
            got = None if opt.flag else _value(argv, i, opt)
            if got is not None:
                opts[opt.dest], i = got
                break
        else:
            raise _NotHere
    if opts[declare.FLEET.dest]:
        raise _NotHere
    if opts[declare.CONNECT.dest] is None and declare.CONNECT.envvar is not None:
        opts[declare.CONNECT.dest] = os.environ.get(declare.CONNECT.envvar) or None
    return opts


def _list(opts: dict[str, object]) -> tuple[list[str], bool]:
    """``jobctl list``'s lines, and whether they go to stderr (no jobs); on a terminal
    the jobs are drawn in rich's table here and no line is left (as the click command:
    ``render.jobs_table``)."""
    uri = opts[declare.CONNECT.dest] or EMBEDDED_URI
    if not isinstance(uri, str):
        raise _NotHere
    driver, transport, host, path, params = split_uri(uri)
    keys = [k for k, _ in params]
    if transport is None and driver in DAEMON_DRIVERS and "socket" not in keys:
        # the default run directory's jobd, where one answers (else click's embedded
        # connection): jobcore.protocol.resolve_default_daemon's rule
        from jobcore.rundir import user_run_dir

        params = (*params, ("socket", str(user_run_dir(RUN_DIR) / RW_SOCKET)))
        transport, keys = "unix", [*keys, "socket"]
    if transport != "unix" or "reconnect" in keys or "socket" not in keys:
        raise _NotHere
    sock_path = dict(reversed(params))["socket"]  # the first one, as URI.param
    as_json, domain, show_all = opts["as_json"], opts["domain"], opts["show_all"]
    if sys.stdout.encoding is None:
        raise _NotHere
    if not sock_path:
        raise _NotHere
    with _Client(sock_path) as client:
        # pipelined, in the click command's order: hello (jobd reads no frame past a hello
        # until it is answered) with the domains, every domain's jobs, every job's info
        hello = (HELLO, [PROTOCOL_VERSION, driver_uri(driver, host, path, params)])
        if domain:
            names = [_domain_ref(client.calls([hello, (LOOKUP_DOMAIN, [domain])])[1])]
        else:
            found = client.calls([hello, (LIST_DOMAINS, [])])[1]
            names = [_domain_ref(ref) for ref in _array(found)]
        jobs = _job_uuids(client, names)
        infos = [_job_info(w) for w in client.calls([(JOB_INFO, [job]) for job in jobs])]
    infos = [
        i
        for i in infos
        if (show_all or i["state"] not in ENDED) and (domain is None or i["domain"] == domain)
    ]
    if as_json:
        import json

        return [json.dumps(infos, indent=None, sort_keys=False, default=str)], False
    if not infos:
        return ["no jobs" + ("" if show_all else " active (--all shows ended ones)")], True
    if may_be_terminal(sys.stdout):
        out = terminal_console()
        if out is not None:  # rich is imported only now, with the whole answer in
            rich_jobs_table(out, infos, False)
            return [], False
    return list(job_lines(infos, False)), False


def _job_uuids(client: _Client, domains: list[str]) -> list[bytes]:
    """Every job of each of ``domains``, page by page, in order."""
    jobs: dict[str, list[bytes]] = {name: [] for name in domains}
    cursors: dict[str, object] = dict.fromkeys(domains, -1)
    while cursors:
        asked = list(cursors)
        pages = client.calls([(LIST_JOBS_PAGE, [name, cursors[name], LIST_PAGE]) for name in asked])
        for name, wire in zip(asked, pages, strict=True):
            page = _array(wire, 2)
            refs, cursor = _array(page[0]), page[1]
            if cursor is None:
                del cursors[name]
            else:
                _check(_is_int(cursor))
                cursors[name] = cursor
            for ref in refs:
                uuid, job_type, dom, state = _array(ref, 4)
                _check(_uuid_bytes(uuid) and isinstance(job_type, str) and isinstance(dom, str))
                _check(state in JOB_STATES)
                jobs[name].append(uuid)
    return [job for name in domains for job in jobs[name]]


def _domain_ref(wire: object) -> str:
    name, uuid = _array(wire, 2)
    _check(isinstance(name, str) and _uuid_bytes(uuid))
    return str(name)


#: JobInfo's fields in their wire order and how each is checked (jobcore.protocol's
#: converter: strict scalars, a float may come as an int, None where the field allows)
_STR, _INT, _FLOAT, _OPT_FLOAT, _OPT_STR, _OPT_INT, _BOOL = range(7)
JOB_INFO_FIELDS = (
    ("uuid", None),
    ("type", _STR),  # an open set of names (jobcore.spec.JobType)
    ("domain", _STR),
    ("state", None),
    ("processed", _INT),
    ("total", _INT),
    ("time_elapsed", _INT),
    ("created", _FLOAT),
    ("started", _OPT_FLOAT),
    ("ended", _OPT_FLOAT),
    ("errmsg", _OPT_STR),
    ("bandwidth", _OPT_INT),
    ("host", _STR),
    ("host_lost", _BOOL),
)


def _job_info(wire: object) -> dict[str, object]:
    """A JobInfo's mapping view (``JobInfo.as_dict()``) from its wire form."""
    values = _array(wire, len(JOB_INFO_FIELDS))
    out: dict[str, object] = {}
    for (name, kind), value in zip(JOB_INFO_FIELDS, values, strict=True):
        out[name] = _scalar(kind, value)
    raw_uuid, state = values[0], values[3]
    _check(_uuid_bytes(raw_uuid))
    out["uuid"] = _uuid_text(raw_uuid)
    _check(state in JOB_STATES)
    processed, total = values[4], values[5]
    if total <= 0:
        progress = 100.0 if state == "completed" else 0.0
    else:
        progress = min(100.0, 100.0 * processed / total)
    keys = list(out)
    keys.insert(keys.index("total") + 1, "progress")
    out["progress"] = progress
    return {k: out[k] for k in keys}


def _scalar(kind: int | None, value: object) -> object:
    if kind is None:
        return value
    if value is None and kind in (_OPT_FLOAT, _OPT_STR, _OPT_INT):
        return None
    if kind in (_STR, _OPT_STR):
        _check(isinstance(value, str))
    elif kind in (_INT, _OPT_INT):
        _check(_is_int(value))
    elif kind is _BOOL:
        _check(isinstance(value, bool))
    else:
        _check(isinstance(value, int | float) and not isinstance(value, bool))
        return float(value)  # type: ignore[arg-type]
    return value


def _uuid_text(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _uuid_bytes(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 16


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _array(value: object, n: int | None = None) -> list[Any]:
    if not isinstance(value, list) or (n is not None and len(value) != n):
        raise _NotHere
    return value


def _check(ok: bool) -> None:
    if not ok:
        raise _NotHere


class _Client:
    """One socket to jobd (``_socket``'s: the socket module's enums cost a start more
    than all of this), requests pipelined in batches; anything but the replies expected:
    _NotHere (the click command then meets it and says what it is)."""

    #: requests written before their replies are read: few enough that their replies fit
    #: the socket's buffers (jobd reads no more of a client that does not drain)
    BATCH = 64

    def __init__(self, path: str) -> None:
        import _socket

        import msgpack  # type: ignore[import-untyped]

        self._msgpack = msgpack
        self._sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self._sock.settimeout(REPLY_TIMEOUT)
        self._ids = 0
        self._buffer = b""
        try:
            self._sock.connect(path)
            self._check_peer(_socket.SOL_SOCKET, _socket.SO_PEERCRED)
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def _check_peer(self, level: int, option: int) -> None:
        """jobd runs as us or root (jobcore.protocol.check_daemon_peer's rule)."""
        import struct

        _pid, uid, _gid = struct.unpack("3i", self._sock.getsockopt(level, option, 12))
        _check(uid in (os.getuid(), 0))

    def calls(self, requests: list[tuple[str, list[object]]]) -> list[Any]:
        """Each request's result, in order."""
        results: list[Any] = []
        for start in range(0, len(requests), self.BATCH):
            batch = requests[start : start + self.BATCH]
            first = self._ids + 1
            frames = []
            for method, args in batch:
                self._ids += 1
                body = self._msgpack.packb([0, self._ids, method, args], use_bin_type=True)
                frames.append(len(body).to_bytes(4, "big") + body)
            self._sock.sendall(b"".join(frames))
            replies: dict[int, Any] = {}
            while len(replies) < len(batch):
                length = int.from_bytes(self._read(4), "big")
                _check(length <= MAX_FRAME)
                reply = self._msgpack.unpackb(self._read(length), raw=False, strict_map_key=True)
                _check(isinstance(reply, list) and len(reply) == 3 and reply[0] == 1)
                _check(_is_int(reply[1]) and first <= reply[1] <= self._ids)
                replies[reply[1]] = reply[2]
            results += [replies[rid] for rid in range(first, self._ids + 1)]
        return results

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self._sock.recv(max(65536, n - len(self._buffer)))
            if not chunk:
                raise _NotHere  # jobd closed the socket
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data
