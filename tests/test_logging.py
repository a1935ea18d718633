"""Logging: the library stays silent unless the application configures logging, and jobd's
log cannot be flooded by one client (issue 8, items 11 and 26)."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
from jobd_helpers import BACKUP_VDB, ROOT, Jobd, frame, jobctl, write

# A fake jobd: answers hello, then pushes a REQUEST (which a client never expects: the
# library logs a warning and goes on), then answers list_domains with no domains.
_FAKE_DAEMON = """
import socket, struct, sys, threading, msgpack
from jobcore.protocol import PROTOCOL_VERSION

def frame(msg):
    body = msgpack.packb(msg)
    return struct.pack(">I", len(body)) + body

def recv(conn):
    head = b""
    while len(head) < 4:
        head += conn.recv(4 - len(head))
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        body += conn.recv(n - len(body))
    return msgpack.unpackb(body)

server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen()

def serve():
    conn, _ = server.accept()
    hello = recv(conn)
    conn.sendall(frame([1, hello[1], [PROTOCOL_VERSION, False, "sim:///default"]]))
    request = recv(conn)
    conn.sendall(frame([0, 99, "list_domains", []]))
    conn.sendall(frame([1, request[1], []]))
    recv(conn)  # until the client goes away

threading.Thread(target=serve, daemon=True).start()
"""

_APP = """
import anyio, logging, sys
MODE = sys.argv[2]
if MODE == "basic":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
if MODE == "structlog":  # the application's own structlog setup stays its own
    import structlog
    structlog.configure(
        processors=[lambda _l, _m, ed: "APP " + ed["event"]],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
import jobcore

async def main():
    async with jobcore.connect(f"sim+unix:///default?socket={sys.argv[1]}") as conn:
        assert await conn.list_domains() == []
        await anyio.sleep(0.2)  # the warning comes from the reader task
    if MODE == "structlog":
        structlog.get_logger().info("mine")

anyio.run(main)
"""


def _library_run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    sock = tmp_path / f"fake-{mode}.sock"
    script = tmp_path / f"app_{mode}.py"
    script.write_text(_FAKE_DAEMON + _APP)
    return subprocess.run(
        [sys.executable, str(script), str(sock), mode],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def test_library_is_silent_unless_the_application_configures_logging(tmp_path: Path) -> None:
    silent = _library_run(tmp_path, "none")
    assert silent.returncode == 0, silent.stderr
    assert silent.stderr == ""

    basic = _library_run(tmp_path, "basic")
    assert basic.returncode == 0, basic.stderr
    assert basic.stderr.splitlines() == [
        "WARNING jobcore.remote: unexpected message from jobd message=Request"
    ]

    app = _library_run(tmp_path, "structlog")
    assert app.returncode == 0, app.stderr
    assert app.stderr.splitlines() == ["APP mine"]  # jobcore neither used nor changed it


# ---- jobd's log -------------------------------------------------------------------------


def _read_replies(sock: socket.socket, count: int) -> None:
    data = b""
    seen = 0
    while seen < count:
        chunk = sock.recv(65536)
        assert chunk, "jobd hung up"
        data += chunk
        while len(data) >= 4:
            (length,) = struct.unpack(">I", data[:4])
            if len(data) < 4 + length:
                break
            reply = msgpack.unpackb(data[4 : 4 + length])
            assert reply[0] == 2 and reply[2] == "BadRequest", reply
            data = data[4 + length :]
            seen += 1


def _log_records(daemon: Jobd) -> list[dict[str, object]]:
    return [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]


def _wait_for(daemon: Jobd, event: str, timeout: float = 10.0) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        records = _log_records(daemon)
        if any(r["event"] == event for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_malformed_frame_flood_logs_a_few_lines(tmp_path: Path) -> None:
    daemon = Jobd(tmp_path / "run").wait_ready()
    try:
        before = len(daemon.log())
        frames = 2000
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(daemon.sock))
            for _ in range(frames // 100):  # 5-byte frames whose body is not msgpack
                s.sendall(frame(b"\xc1") * 100)
                _read_replies(s, 100)
        records = _wait_for(daemon, "malformed frame repeated")  # at disconnect
        logged = len(daemon.log()) - before
    finally:
        daemon.stop()
    malformed = [r for r in records if str(r["event"]).startswith("malformed frame")]
    assert [r["event"] for r in malformed] == ["malformed frame", "malformed frame repeated"]
    assert malformed[1]["count"] == frames - 1
    flood_client = max(int(str(r["client"])) for r in records if "client" in r)
    of_flood = [r["event"] for r in records if r.get("client") == flood_client]
    # connected, the first malformed frame, the count at disconnect, disconnected
    assert len(of_flood) <= 4, of_flood
    assert len([r for r in records if "client" not in r]) <= 4, records  # ready, stopped…
    assert logged < 2000, f"{logged} bytes of log for {frames} malformed frames"


def test_requests_before_hello_are_counted_not_logged_each(tmp_path: Path) -> None:
    daemon = Jobd(tmp_path / "run").wait_ready()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(daemon.sock))
            s.sendall(
                b"".join(frame(msgpack.packb([0, i, "list_domains", []])) for i in range(500))
            )
            _read_replies_any(s, 500)
        records = _wait_for(daemon, "request refused repeated")  # at disconnect
    finally:
        daemon.stop()
    refused = [r for r in records if str(r["event"]).startswith("request refused")]
    assert [r["event"] for r in refused] == ["request refused", "request refused repeated"]
    assert refused[1]["count"] == 499


def _read_replies_any(sock: socket.socket, count: int) -> None:
    data = b""
    seen = 0
    while seen < count:
        chunk = sock.recv(65536)
        assert chunk, "jobd hung up"
        data += chunk
        while len(data) >= 4 and len(data) >= 4 + struct.unpack(">I", data[:4])[0]:
            data = data[4 + struct.unpack(">I", data[:4])[0] :]
            seen += 1


def test_one_info_line_per_job_at_begin_and_at_end(tmp_path: Path) -> None:
    daemon = Jobd(tmp_path / "run").wait_ready()
    try:
        uri = daemon.uri("rate=1048576")
        began = jobctl(uri, "begin", "vm1", write(tmp_path, "b.xml", BACKUP_VDB.format(tag="l")))
        assert began.returncode == 0, began.stderr
        job = began.stdout.strip()
        for verb in ("pause", "resume", "abort"):
            assert jobctl(uri, verb, job).returncode == 0
        assert jobctl(uri, "wait", job).returncode == 4  # cancelled
        records = _wait_for(daemon, "job ended")
    finally:
        daemon.stop()
    about_job = [r for r in records if job in json.dumps(r)]
    assert [(r["event"], r["level"]) for r in about_job] == [
        ("job began", "info"),
        ("job ended", "info"),
    ]


def test_log_file_is_reopened_after_logrotate_moves_it(tmp_path: Path) -> None:
    log_file = tmp_path / "jobd.log"
    daemon = Jobd(tmp_path / "run", "--log-file", str(log_file)).wait_ready()
    try:
        deadline = time.monotonic() + 10  # the sockets may take clients before the line lands
        while "jobd ready" not in log_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "jobd ready" in log_file.read_text()
        assert daemon.log() == ""  # nothing on stderr
        log_file.rename(tmp_path / "jobd.log.1")  # what logrotate does (without copytruncate)
        assert jobctl(daemon.uri(), "domains").returncode == 0
    finally:
        daemon.stop()
    fresh = [json.loads(line)["event"] for line in log_file.read_text().splitlines()]
    assert "hello" in fresh and fresh[-1] == "jobd stopped"
    rotated = [
        json.loads(line)["event"] for line in (tmp_path / "jobd.log.1").read_text().splitlines()
    ]
    assert "jobd ready" in rotated and "hello" not in rotated  # jobctl came after the move


def test_noise_limit_logs_the_count_periodically() -> None:
    from jobcore.daemon.config import NOISE_INTERVAL
    from jobcore.daemon.sessions import _Noise

    lines: list[tuple[str, dict[str, object]]] = []

    class Log:
        def warning(self, event: str, **fields: object) -> None:
            lines.append((event, fields))

    now = [100.0]
    noise = _Noise(Log(), lambda: now[0])
    for i in range(5):
        noise.line("warning", "malformed frame", n=i)
    now[0] += NOISE_INTERVAL
    noise.line("warning", "malformed frame", n=5)  # the interval is over: the count so far
    noise.line("warning", "malformed frame", n=6)
    noise.flush()  # at disconnect
    noise.flush()  # nothing new: nothing logged
    assert lines == [
        ("malformed frame", {"n": 0}),
        ("malformed frame repeated", {"count": 5, "last": {"n": 5}}),
        ("malformed frame repeated", {"count": 1, "last": {"n": 6}}),
    ]


_LAZY = """
import logging, sys
from jobcore.log import LogEvent, get_logger

log = get_logger("jobcore.lazy", job="j1").bind(domain="vm1")
log.info("dropped", n=1)  # no handler configured: below the level, nothing is made
log.debug("dropped too")
print("structlog" in sys.modules, "rich" in sys.modules)
records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append(record)

logging.getLogger("jobcore").addHandler(Keep())
logging.getLogger("jobcore").setLevel(logging.INFO)
log.debug("below info")
log.info("kept", n=2)
log.bind(extra=3).warning("bound later")
print("structlog" in sys.modules)
for r in records:
    print(r.name, r.levelname, type(r.msg) is LogEvent, sorted(r.msg.items()))
"""


def test_loggers_load_structlog_only_when_a_call_gets_through(tmp_path: Path) -> None:
    """A process that never logs (a jobctl command) loads no structlog, and so no rich;
    once a call passes its logger's level, the record is what structlog made before."""
    script = tmp_path / "lazy.py"
    script.write_text(_LAZY)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "False False",
        "True",
        "jobcore.lazy INFO True [('domain', 'vm1'), ('event', 'kept'), ('job', 'j1'), ('n', 2)]",
        "jobcore.lazy WARNING True "
        "[('domain', 'vm1'), ('event', 'bound later'), ('extra', 3), ('job', 'j1')]",
    ]
