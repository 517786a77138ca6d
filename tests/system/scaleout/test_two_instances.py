"""Two service instances (separate gunicorn masters, two workers each, distinct ports) on one real Redis.

A nonce is accepted once across both, a challenge issued by one is consumed at the other, the rate limit
counts the requests of both, and 32 simultaneous submissions of one document get exactly one 200.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import tools
from tests.support.redis_server import redis_server
from tests.support.service import DocumentFactory

from . import properties
from .conftest import service_pair

pytestmark = [pytest.mark.slow, tools.requires_redis]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="module")
def pair(redis_url: str, factory: DocumentFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        properties.Pair]:
    with service_pair(redis_url, factory, tmp_path_factory.mktemp("pair"),
                      rate_limit_per_minute=properties.GENEROUS_RATE_LIMIT) as instances:
        yield instances


def test_nonce_accepted_by_one_is_refused_by_the_other(pair: properties.Pair, factory: DocumentFactory) -> None:
    properties.check_replay_refused_across(pair, factory)


def test_challenge_issued_by_one_is_consumed_once_at_the_other(pair: properties.Pair,
                                                               factory: DocumentFactory) -> None:
    properties.check_challenge_crosses_instances(pair, factory)


def test_racing_posts_over_both_instances_accept_once(pair: properties.Pair, factory: DocumentFactory) -> None:
    properties.check_one_of_racing_posts_accepted(pair, factory)


def test_rate_limit_is_shared(redis_url: str, factory: DocumentFactory, tmp_path: Path) -> None:
    with service_pair(redis_url, factory, tmp_path,
                      rate_limit_per_minute=properties.SMALL_RATE_LIMIT) as metered:
        properties.check_rate_limit_shared(metered, properties.SMALL_RATE_LIMIT)
