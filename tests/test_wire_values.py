"""Wire values (jobcore.protocol's cattrs converter): every attrs value round-trips as
the array of its fields, and a malformed one is refused with a message, never coerced
(cattrs alone would turn a string into a chain of characters, drop extra items, or take
a bool for an int)."""

from __future__ import annotations

import uuid
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from jobcore.driver import DiskInfo, DomainInfo
from jobcore.events import EventKind, JobEvent
from jobcore.info import JobInfo
from jobcore.lifecycle import JobState
from jobcore.methods import Method
from jobcore.protocol import (
    BadRequest,
    EventPush,
    JobPage,
    JobRef,
    decode_message,
    decode_result,
    encode_message,
    encode_value,
)
from jobcore.spec import JobType

U = uuid.UUID(int=7)
INFO = JobInfo(
    U, JobType("backup"), "vm1", JobState.RUNNING, 1, 2, 3, 4.0, None, 5.5, None, 7, "hv1"
)
DOMAIN = DomainInfo("vm1", U, (DiskInfo("vda", ("/a", "/b"), "qcow2", 1 << 30),), 512, True)
EVENT = JobEvent(
    EventKind.FINAL, U, "backup", "vm1", JobState.COMPLETED, JobState.RUNNING, 2, 2, 9.0,
    {"type": 3, "errmsg": None}, 0,
)  # fmt: skip


def wire(value: object) -> Any:
    """What the peer decodes: the value's wire form through msgpack."""
    return msgpack.unpackb(msgpack.packb(encode_value(value), use_bin_type=True), raw=False)


def test_values_travel_as_their_fields_in_order() -> None:
    assert wire(INFO) == [
        U.bytes, "backup", "vm1", "running", 1, 2, 3, 4.0, None, 5.5, None, 7, "hv1", False
    ]  # fmt: skip
    assert wire(DOMAIN) == [
        "vm1", U.bytes, [["vda", ["/a", "/b"], "qcow2", 1 << 30, [], "virtio"]], 512, True, "test"
    ]  # fmt: skip
    assert decode_result(Method.JOB_INFO, wire(INFO)) == INFO
    assert type(decode_result(Method.JOB_INFO, wire(INFO)).type) is JobType
    assert decode_result(Method.DOMAIN_INFO, wire(DOMAIN)) == DOMAIN
    page = JobPage((JobRef(U, JobType("blockpull"), "vm2", JobState.QUEUED),), None)
    assert decode_result(Method.LIST_JOBS_PAGE, wire(page)) == page
    frame = encode_message(EventPush(3, EVENT))
    assert decode_message(frame[4:]) == EventPush(3, EVENT)


BAD_DOMAINS = {
    "short": ["vm1", U.bytes, [], 512, True],
    "long": ["vm1", U.bytes, [], 512, True, "test", "extra"],
    "chain-as-string": ["vm1", U.bytes, [["vda", "/a", "qcow2", 1, [], "virtio"]], 512, True, "t"],
    "bool-as-int": ["vm1", U.bytes, [], True, True, "test"],
    "int-as-bool": ["vm1", U.bytes, [], 512, 1, "test"],
    "name-not-str": [7, U.bytes, [], 512, True, "test"],
    "uuid-as-str": ["vm1", str(U), [], 512, True, "test"],
    "map": {"name": "vm1"},
}


@pytest.mark.parametrize("value", BAD_DOMAINS.values(), ids=BAD_DOMAINS.keys())
def test_malformed_values_are_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        decode_result(Method.DOMAIN_INFO, value)


@pytest.mark.parametrize(
    ("method", "value"),
    [
        (Method.JOB_STATS, {"type": [1]}),
        (Method.JOB_STATS, [1]),
        (Method.LEGACY_JOB_INFO, [1, True]),
        (Method.JOB_ABORT, 0),
        (Method.JOB_XML_DESC, b"<job/>"),
        (Method.JOB_INFO, [*wire(INFO)[:3], "no-such-state", *wire(INFO)[4:]]),
        (Method.LIST_DOMAINS, "vm1"),
        (Method.LIST_JOBS_PAGE, [[["x"]], None]),
    ],
)
def test_malformed_results_are_refused(method: Method, value: Any) -> None:
    with pytest.raises(ValueError):
        decode_result(method, value)


def test_a_malformed_event_push_is_a_bad_request() -> None:
    body = msgpack.packb([3, 1, [*wire(EVENT)[:9], {"k": {"nested": 1}}, 0]])
    with pytest.raises(BadRequest, match="malformed EVENT"):
        decode_message(body)
