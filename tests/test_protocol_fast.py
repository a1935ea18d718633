"""The fast paths of jobcore.protocol's decoding: a body too small to exceed the item
budget is decoded without the counting hooks, with the same outcome as with them; values
decode with each class's field hooks looked up once, into what cattrs makes of them."""

from __future__ import annotations

import anyio
import msgpack  # type: ignore[import-untyped]
import pytest

import jobcore
from jobcore.protocol import (
    BadRequest,
    DecodeLimits,
    InfoPage,
    JobPage,
    JobRef,
    Reply,
    ServerHello,
    converter,
    decode_message,
    decode_value,
    encode_value,
)

LIMITS = DecodeLimits(max_array_len=1000, max_map_len=1000, max_items=64)


def _reply_of(items: list[object]) -> bytes:
    return msgpack.packb([1, 7, items])  # type: ignore[no-any-return]


def test_the_densest_body_the_fast_path_takes_stays_within_the_budget() -> None:
    """[1, 7, [[]…26]] is 32 bytes (the largest body the hooks are skipped for, with a
    budget of 64) and counts (1 + 3) + (1 + 26) + 26 = 57 items: within the budget."""
    body = _reply_of([[]] * 26)
    assert len(body) == 32 and 2 * len(body) <= LIMITS.max_items
    assert decode_message(body, LIMITS) == Reply(7, [[]] * 26)


def test_a_body_over_the_bound_is_still_counted_and_refused() -> None:
    body = _reply_of([[]] * 40)  # 45 bytes: counted, 1 + 3 + 41 + 40 = 85 > 64
    assert 2 * len(body) > LIMITS.max_items
    with pytest.raises(BadRequest, match="too many items"):
        decode_message(body, LIMITS)


@pytest.mark.parametrize("n", range(20, 40))
def test_both_paths_agree_around_the_bound(n: int) -> None:
    """Each body, decoded as it is and once more with a budget so large that the hooks are
    skipped, gives the same message, or the first refuses it for its item count only."""
    body = _reply_of([{}] * n)
    wide = DecodeLimits(LIMITS.max_array_len, LIMITS.max_map_len, 1 << 20)
    expected = decode_message(body, wide)
    try:
        assert decode_message(body, LIMITS) == expected
    except BadRequest as exc:
        assert "too many items" in str(exc)
        assert 2 * len(body) > LIMITS.max_items  # refused only where the hooks count


BACKUP = (
    "<job type='backup'><domainbackup><disks><disk name='vdb' type='file'>"
    "<target file='/b/fast-vdb.qcow2'/></disk></disks></domainbackup></job>"
)


async def _values() -> list[object]:
    """Real values of every kind a reply carries, from an in-process sim connection."""
    async with jobcore.connect("sim:///default?rate=0") as conn:
        sub = conn.subscribe()
        dom = await conn.lookup_domain("vm1")
        explained = await dom.job_explain(BACKUP)
        job = await dom.job_begin(BACKUP)
        ended = await job.wait()
        events = [await sub.get() for _ in range(3)]
        return [
            await dom.info(),
            ended,
            *events,
            explained,
            JobRef(job.uuid, job.type, job.domain, ended.state),
            JobPage((JobRef(job.uuid, job.type, job.domain, ended.state),), None),
            InfoPage((ended, ended), 7),
            ServerHello(2, False, "sim:///default"),
        ]


def test_value_coding_equals_cattrs_field_by_field_coding() -> None:
    """Each value encodes (hooks looked up once per class) as cattrs' own per-field
    ``unstructure_attrs_astuple`` does, and decodes into what it was and into what
    ``structure_attrs_fromtuple`` makes of it; a wrong item in any position is refused
    by both."""
    values = anyio.run(_values)
    assert {type(v).__name__ for v in values} >= {"DomainInfo", "JobInfo", "JobEvent"}
    for value in values:
        cls = type(value)
        assert encode_value(value) == converter.unstructure_attrs_astuple(value)
        wire = msgpack.unpackb(msgpack.packb(encode_value(value)))  # as it travels
        assert decode_value(wire, cls) == value
        assert converter.structure_attrs_fromtuple(tuple(wire), cls) == value
        for i in range(len(wire)):
            bad = [*wire[:i], [[[]]], *wire[i + 1 :]]
            with pytest.raises(ValueError):
                decode_value(bad, cls)
            with pytest.raises((ValueError, TypeError)):
                converter.structure_attrs_fromtuple(tuple(bad), cls)
