"""The suite's own use of the shared Redis: a database other than 0, and no keys left behind."""

from __future__ import annotations

import os
import uuid

import pytest
import redis

from conftest import REDIS_URL, _drop_redis_keys, unavailable


def test_the_suite_keeps_off_redis_database_0() -> None:
    if "IPN_TEST_REDIS_URL" in os.environ:
        pytest.skip("IPN_TEST_REDIS_URL chooses the database")
    assert redis.Redis.from_url(REDIS_URL).connection_pool.connection_kwargs["db"] != 0


def test_a_sessions_queue_keys_are_dropped_and_no_other() -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable("Redis", exc)
    queue = f"ipn-test-{uuid.uuid4().hex[:8]}"
    other = f"ipn-test-{uuid.uuid4().hex[:8]}"
    try:
        for key in (queue, f"{queue}-a1b2c3d4", f"_kombu.binding.{queue}", other):
            client.rpush(key, "x")
        _drop_redis_keys(REDIS_URL, queue)
        assert list(client.scan_iter(match=f"*{queue}*")) == []
        assert client.exists(other)
    finally:
        client.delete(other)
        client.close()
