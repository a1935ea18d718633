"""The fast paths of jobcore.protocol's decoding: a body too small to exceed the item
budget is decoded without the counting hooks, with the same outcome as with them."""

from __future__ import annotations

import msgpack  # type: ignore[import-untyped]
import pytest

from jobcore.protocol import BadRequest, DecodeLimits, Reply, decode_message

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
