"""The double buffer: a request keeps its version to the last token; publishing never overwrites it."""

import pytest

from scheduler.errors import AdapterNotServed
from scheduler.serving import ServingTable


def test_publish_alternates_buffers_and_new_requests_see_latest():
    table = ServingTable()
    table.register("a", (3, 4))
    assert table.publish_target("a") == 3
    table.mark_published("a", 3, 0)
    lease = table.acquire("a")
    assert (lease.slot, lease.version, lease.cache_salt) == (3, 0, "adapter:a:@0")
    table.release(lease)
    assert table.publish_target("a") == 4
    table.mark_published("a", 4, 1)
    assert table.acquire("a").version == 1


def test_in_flight_request_blocks_rewrite_of_its_buffer():
    table = ServingTable()
    table.register("a", (3, 4))
    table.mark_published("a", 3, 0)
    old = table.acquire("a")  # in flight on slot 3, version 0
    table.mark_published("a", table.publish_target("a"), 1)  # slot 4 → live v1
    assert table.publish_target("a") is None  # slot 3 still serves `old`
    newer = table.acquire("a")
    assert (newer.slot, newer.version) == (4, 1)
    table.release(old)
    assert table.publish_target("a") == 3
    table.release(newer)


def test_unknown_or_unpublished_adapter_is_not_served():
    table = ServingTable()
    with pytest.raises(AdapterNotServed):
        table.acquire("missing")
    table.register("b", (1, 2))
    with pytest.raises(AdapterNotServed):
        table.acquire("b")
    assert table.adapters() == []
