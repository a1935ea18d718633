"""A frame body cannot decode into millions of objects: requests are held to
``REQUEST_LIMITS`` (array and map lengths from their headers, a total item budget),
while valid big messages (a 1 MiB XML document, a full page of job refs) still decode."""

from __future__ import annotations

import socket
import struct
import time
import uuid
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest
from jobd_helpers import Jobd, frame, read_msg
from test_jobd_io import peak_rss, rss

from jobcore.lifecycle import JobState
from jobcore.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    REQUEST_LIMITS,
    BadRequest,
    Reply,
    Request,
    decode_message,
    encode_job_ref,
)

_N = MAX_FRAME - 64
#: [0, 1, "hello", [{}, {}, … 4 MiB of empty maps]]
_EMPTY_MAPS = b"\x94\x00\x01\xa5hello\xdd" + struct.pack(">I", _N) + b"\x80" * _N


def _nested(width: int, depth_items: int) -> bytes:
    """[0, 1, "hello", [[{}…width]…]]: arrays within the length limit, many of them."""
    return msgpack.packb([0, 1, "hello", [[{}] * width] * depth_items])  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "body",
    [_EMPTY_MAPS, _nested(255, 16000), msgpack.packb([0, 1, "hello", [[[1000] * 255] * 250] * 20])],
    ids=["one-long-array", "many-short-arrays", "nested-ints"],
)
def test_request_decode_refuses_amplification_quickly(body: bytes) -> None:
    assert len(body) <= MAX_FRAME
    t0 = time.perf_counter()
    with pytest.raises(BadRequest, match="message limits"):
        decode_message(body, REQUEST_LIMITS)
    assert time.perf_counter() - t0 < 0.05


def test_valid_big_messages_still_decode() -> None:
    xml = "<job type='backup'><description>" + "x" * (1 << 20) + "</description></job>"
    msg = decode_message(msgpack.packb([0, 7, "job_begin", ["vm1", xml, 0]]), REQUEST_LIMITS)
    assert isinstance(msg, Request) and msg.args[1] == xml
    refs = [encode_job_ref(uuid.uuid4(), "backup", "vm1", JobState.RUNNING) for _ in range(20000)]
    reply = decode_message(msgpack.packb([1, 8, [refs, 20000]]))  # a client reads a big page
    assert isinstance(reply, Reply)
    kinds = [f"k{i}" for i in range(64)]  # the most a filter takes
    sub = [0, 9, "subscribe", [None, None, kinds, kinds, 16]]
    assert isinstance(decode_message(msgpack.packb(sub), REQUEST_LIMITS), Request)


def test_jobd_memory_stays_bounded_on_an_amplifying_frame(tmp_path: Path) -> None:
    daemon = Jobd(tmp_path / "run").wait_ready()
    try:
        before = rss(daemon.proc.pid)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(daemon.sock))
            s.sendall(frame(msgpack.packb([0, 1, "hello", [PROTOCOL_VERSION, "sim:///default"]])))
            assert read_msg(s)[0] == 1
            for i in range(3):
                body = _EMPTY_MAPS[:2] + bytes([2 + i]) + _EMPTY_MAPS[3:]  # request id 2+i
                s.sendall(frame(body))
                reply = read_msg(s)
                assert reply[0] == 2, reply  # an error reply
                assert "BadRequest" in str(reply) or "message limits" in str(reply), reply
            peak = peak_rss(daemon.proc.pid, 0.5, before + (64 << 20))
        assert peak - before < 64 << 20, f"jobd grew {(peak - before) >> 20} MiB"
    finally:
        daemon.stop()
