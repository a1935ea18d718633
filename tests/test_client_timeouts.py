"""A client never hangs on a socket that accepts but does not answer: jobd has
jobcore.remote.HELLO_TIMEOUT seconds to answer hello and FRAME_TIMEOUT seconds to finish a
frame whose header arrived (both shortened here)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner, Result

import jobcore
import jobcore.remote
from jobcore import cli
from jobcore.protocol import (
    PROTOCOL_VERSION,
    DaemonUnreachable,
    Reply,
    ServerHello,
    decode_message,
    encode_message,
    encode_server_hello,
)

SHORT = 0.5


class FakeDaemon:
    """A UNIX listener that accepts and then behaves as ``mode`` says: 'silent' reads and
    never answers; 'slowframe' sends a frame header and never the body; 'hello-then-stall'
    answers hello properly, then sends half a frame."""

    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        self.mode = mode
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(str(path))
        self.srv.listen(8)
        self.conns: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.srv.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)
            if self.mode == "slowframe":
                conn.sendall(struct.pack(">I", 1000))
            elif self.mode == "hello-then-stall":
                conn.settimeout(5)
                header = conn.recv(4)
                (length,) = struct.unpack(">I", header)
                body = b""
                while len(body) < length:
                    body += conn.recv(length - len(body))
                hello = decode_message(body)
                reply = Reply(
                    hello.id,  # type: ignore[union-attr]
                    encode_server_hello(ServerHello(PROTOCOL_VERSION, False, "sim:///default")),
                )
                conn.sendall(encode_message(reply))
                conn.sendall(struct.pack(">I", 1000) + b"x" * 10)  # and never the rest

    def close(self) -> None:
        self._stop = True
        self.thread.join(5)
        for conn in self.conns:
            conn.close()
        self.srv.close()

    @property
    def uri(self) -> str:
        return f"sim+unix:///default?socket={self.path}"


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    # raising=False: the names are new (a client without them hangs: the tests fail)
    monkeypatch.setattr(jobcore.remote, "HELLO_TIMEOUT", SHORT, raising=False)
    monkeypatch.setattr(jobcore.remote, "FRAME_TIMEOUT", SHORT, raising=False)


@pytest.fixture
def fake(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeDaemon]:
    daemon = FakeDaemon(tmp_path / "fake.sock", request.param)
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.mark.anyio
@pytest.mark.parametrize("fake", ["silent", "slowframe"], indirect=True)
async def test_connect_gives_up_when_hello_is_not_answered(
    fake: FakeDaemon, short_timeouts: None
) -> None:
    started = time.monotonic()
    with anyio.fail_after(10):  # the old client waited forever
        with pytest.raises(DaemonUnreachable) as err:
            async with jobcore.connect(fake.uri):
                pass
    assert time.monotonic() - started < 5
    text = str(err.value)
    assert str(fake.path) in text
    assert f"within {SHORT:g} s" in text


@pytest.mark.anyio
@pytest.mark.parametrize("fake", ["hello-then-stall"], indirect=True)
async def test_a_frame_that_never_completes_loses_the_connection(
    fake: FakeDaemon, short_timeouts: None
) -> None:
    with anyio.fail_after(10):
        async with jobcore.connect(fake.uri) as conn:
            with pytest.raises(DaemonUnreachable, match=r"header of a 1000-byte frame"):
                await conn.list_domains()


@pytest.mark.parametrize("fake", ["silent"], indirect=True)
def test_jobctl_exits_unreachable_on_a_silent_socket(
    fake: FakeDaemon, short_timeouts: None
) -> None:
    started = time.monotonic()
    results: list[Result] = []
    runner = threading.Thread(
        target=lambda: results.append(CliRunner().invoke(cli.main, ["-c", fake.uri, "list"])),
        daemon=True,
    )
    runner.start()
    runner.join(15)
    assert not runner.is_alive(), "jobctl list still hangs after 15 s"
    (result,) = results
    assert result.exit_code == cli.ExitCode.UNREACHABLE, result.output
    assert "did not answer hello" in result.output
    assert time.monotonic() - started < 10
