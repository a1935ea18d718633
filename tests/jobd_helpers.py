"""Helpers for the tests that run a real jobd: the daemon process (``Jobd``, ``daemon_with``),
jobctl as a subprocess, and a hand-driven client speaking jobd's frames (``RawClient``:
length-prefixed msgpack, design/daemon.md "Wire protocol"), with no jobcore client code in
the way."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import msgpack  # type: ignore[import-untyped]

from jobcore.protocol import PROTOCOL_VERSION

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
BACKUP_VDB = """<job type='backup'>
  <domainbackup><disks>
    <disk name='vdb' type='file'><target file='/b/{tag}-vdb.qcow2'/></disk>
  </disks></domainbackup>
</job>"""
BACKUP_VDA = """<job type='backup'>
  <domainbackup><disks>
    <disk name='vda' type='file'><target file='/b/{tag}-vda.qcow2'/></disk>
    <disk name='vdb' backup='no'/>
  </disks></domainbackup>
</job>"""
PULL_VDA = "<job type='blockpull'><disk name='vda'/></job>"


# ---- the daemon process -------------------------------------------------------------------


class Jobd:
    """A jobd process on its own run directory (``prefix``: a command to run it under, e.g.
    ``prlimit``). As a context manager: stopped on exit."""

    def __init__(
        self,
        run_dir: Path,
        *args: str,
        prefix: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_path = run_dir.parent / f"{run_dir.name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "jobcore.daemon", "--run-dir", str(run_dir), *args],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            cwd=ROOT,
            env=None if env is None else {**os.environ, **env},
        )

    @property
    def sock(self) -> Path:
        return self.run_dir / "jobd.sock"

    @property
    def ro_sock(self) -> Path:
        return self.run_dir / "jobd-ro.sock"

    def uri(self, query: str = "", *, readonly: bool = False, host: str = "default") -> str:
        """A client URI; a simulated host's parameters are set by the hello that opens it,
        so tests wanting another rate name another host."""
        path = self.ro_sock if readonly else self.sock
        return f"sim+unix:///{host}?socket={path}" + (f"&{query}" if query else "")

    def _accepts(self) -> bool:
        """Both sockets take connections (a socket file exists before it listens)."""
        for path in (self.sock, self.ro_sock):
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(path))
                except OSError:
                    return False
        return True

    def wait_ready(self, timeout: float = 15.0) -> Jobd:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"jobd exited {self.proc.returncode}: {self.log()}")
            if self.sock.exists() and self.ro_sock.exists() and self._accepts():
                return self
            time.sleep(0.05)
        raise AssertionError(f"jobd did not start: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Jobd:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def daemon_with(base: Path, config: str | None = None, *args: str) -> Jobd:
    """A ready jobd on ``base/run``, with ``config`` (TOML) in ``base/jobd.toml`` if given."""
    if config is not None:
        path = base / "jobd.toml"
        path.write_text(config)
        args = ("--config", str(path), *args)
    return Jobd(base / "run", *args).wait_ready()


# ---- jobctl -------------------------------------------------------------------------------


def jobctl(
    uri: str | None,
    *args: str,
    stdin: str | None = None,
    timeout: float = 30,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("JOBCORE_URI", None)
    if uri is not None:
        full_env["JOBCORE_URI"] = uri
    return subprocess.run(
        [sys.executable, "-m", "jobcore.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
        check=False,
    )


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jobctl: error: ")
    return lines[0]


# ---- the wire, by hand ---------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    """One frame: a 4-byte big-endian length, then ``body``."""
    return struct.pack(">I", len(body)) + body


def read_msg(sock: socket.socket) -> list[Any]:
    """The next frame from ``sock``, decoded."""
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        assert chunk, "connection closed"
        header += chunk
    (length,) = struct.unpack(">I", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "connection closed"
        body += chunk
    msg: list[Any] = msgpack.unpackb(body)
    return msg


class RawClient:
    """A hand-driven client socket. Connecting sends ``hello`` for ``uri`` (unless None)
    and keeps the answer in ``hello``; ``ready`` also checks that it succeeded."""

    def __init__(
        self, path: Path, uri: str | None = "sim:///default", *, timeout: float = 10
    ) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._ids = 0
        self.hello: list[Any] | None = None if uri is None else self.say_hello(uri)

    @classmethod
    def ready(cls, path: Path, uri: str = "sim:///default", *, timeout: float = 10) -> RawClient:
        client = cls(path, uri, timeout=timeout)
        assert client.hello is not None and client.hello[0] == 1, client.hello
        return client

    def say_hello(self, uri: str) -> list[Any]:
        """Send ``hello`` for ``uri`` (again, after a refused one, say): its reply."""
        return self.call("hello", PROTOCOL_VERSION, uri)

    def send(self, msg: list[Any]) -> None:
        """Send any message as it is (a request with an id of the caller's, a CANCEL…)."""
        self.sock.sendall(frame(msgpack.packb(msg)))

    def request(self, method: str, *args: object) -> int:
        """Send a request with the next id; its id."""
        self._ids += 1
        self.send([0, self._ids, method, list(args)])
        return self._ids

    def recv(self) -> list[Any]:
        return read_msg(self.sock)

    def call(self, method: str, *args: object) -> list[Any]:
        """Send a request and read until its reply, or an error frame with id 0 (jobd
        refusing or closing the connection); other frames are dropped."""
        rid = self.request(method, *args)
        while True:
            msg = self.recv()
            if msg[0] in (1, 2) and msg[1] in (rid, 0):
                return msg

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def ok(reply: list[Any]) -> Any:
    """A reply's result, once checked to be a reply (not an error)."""
    assert reply[0] == 1, reply
    return reply[2]
