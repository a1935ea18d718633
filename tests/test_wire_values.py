"""Wire values (jobcore.protocol's cattrs converter): every attrs value round-trips as
the array of its fields, and a malformed one is refused with a message, never coerced
(cattrs alone would turn a string into a chain of characters, drop extra items, or take
a bool for an int)."""

from __future__ import annotations

import uuid
from typing import Any

import attrs
import msgpack  # type: ignore[import-untyped]
import pytest

from jobcore.driver import DiskInfo, DomainInfo
from jobcore.events import EventKind, JobEvent
from jobcore.info import HostInfo, HostState, JobInfo
from jobcore.lifecycle import JobState
from jobcore.methods import Method
from jobcore.protocol import (
    BadRequest,
    EventPush,
    InfoPage,
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


LOST_INFO = attrs.evolve(INFO, host="hv2", host_lost=True, errmsg="é" * 10)
HOSTS = [
    HostInfo("hv1", HostState.LIVE, 0.25, 10.0, 2, 5, 4242),
    HostInfo("hv2", HostState.FENCED, 31.5, 1.0, 0, 3, 77, "hv1", "its disk died"),
]


def test_fleet_values_travel_as_their_fields_in_order() -> None:
    assert wire(HOSTS[1]) == ["hv2", "fenced", 31.5, 1.0, 0, 3, 77, "hv1", "its disk died"]
    assert decode_result(Method.FLEET_HOSTS, wire(HOSTS)) == HOSTS
    fenced = decode_result(Method.FENCE_HOST, wire(HOSTS[1]))
    assert fenced == HOSTS[1] and type(fenced.state) is HostState
    assert dict(fenced) == fenced.as_dict() and fenced["state"] == "fenced"
    page = InfoPage((INFO, LOST_INFO), 41)
    assert wire(page)[1] == 41 and wire(page)[0][1][-2:] == ["hv2", True]
    back = decode_result(Method.LIST_FLEET_JOBS, wire(page))
    assert back == page and back.infos[1].host_lost
    last = InfoPage((), None)
    assert decode_result(Method.LIST_FLEET_JOBS, wire(last)) == last


BAD_FLEET = {
    "host-state-unknown": (Method.FENCE_HOST, ["hv2", "gone", 1.0, 1.0, 0, 0, 1, None, None]),
    "host-short": (Method.FENCE_HOST, ["hv2", "lost", 1.0, 1.0, 0, 0, 1, None]),
    "host-age-as-str": (Method.FENCE_HOST, ["hv2", "lost", "1", 1.0, 0, 0, 1, None, None]),
    "host-jobs-as-bool": (Method.FENCE_HOST, ["hv2", "lost", 1.0, 1.0, True, 0, 1, None, None]),
    "hosts-not-a-list": (Method.FLEET_HOSTS, {"hv1": 1}),
    "page-no-cursor": (Method.LIST_FLEET_JOBS, [[]]),
    "page-cursor-as-str": (Method.LIST_FLEET_JOBS, [[], "41"]),
    "page-of-refs": (Method.LIST_FLEET_JOBS, [[[U.bytes, "backup", "vm1", "running"]], None]),
    "info-lost-as-int": (Method.LIST_FLEET_JOBS, [[[*wire(INFO)[:-1], 1]], None]),
    "info-version-1": (Method.JOB_INFO, wire(INFO)[:-2]),
}


@pytest.mark.parametrize(("method", "value"), BAD_FLEET.values(), ids=BAD_FLEET.keys())
def test_malformed_fleet_results_are_refused(method: Method, value: Any) -> None:
    with pytest.raises(ValueError):
        decode_result(method, value)


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
