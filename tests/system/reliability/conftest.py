"""Shared fixtures of the reliability tests: they need redis-server and start real processes."""

from __future__ import annotations

import pytest

from tests.support.redis_server import redis_available

requires_redis = pytest.mark.skipif(not redis_available(), reason="redis-server and redis-cli are not installed")
