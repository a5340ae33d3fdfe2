"""Fixtures for engine tests."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def redis_port(tmp_path):
    """A real standalone redis-server on a free loopback port (no persistence), stopped afterwards."""
    from benchmarks.common import redis_fixture

    fixture = redis_fixture()
    if fixture.REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; `make system-deps` does it)")
    with fixture.local_redis_server(tmp_path) as port:
        yield port
