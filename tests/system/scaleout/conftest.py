"""Fixtures of the scale-out tests: the document factory and a pair of service instances on one store."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.service import DocumentFactory, ServiceProcess

from .properties import Pair, service_env


@pytest.fixture(scope="package")
def factory(tmp_path_factory: pytest.TempPathFactory) -> DocumentFactory:
    """A PKI generated around the current time, pinned in a temporary directory."""
    return DocumentFactory.around_now(tmp_path_factory.mktemp("pinned"))


@contextlib.contextmanager
def service_pair(store_url: str, factory: DocumentFactory, workdir: Path, *,
                 rate_limit_per_minute: int, min_replicas: int | None = None) -> Iterator[Pair]:
    """Two instances (separate gunicorn masters, two workers each) on ``store_url``, started side by side.

    ``min_replicas`` sets ATTEST_STORE_MIN_REPLICAS; ``None`` leaves it unset (the default of the URL's topology).
    """
    env = service_env(store_url, factory.pinned_dir, workdir, rate_limit_per_minute=rate_limit_per_minute)
    if min_replicas is not None:
        env["ATTEST_STORE_MIN_REPLICAS"] = str(min_replicas)
    instances = [ServiceProcess(env, workdir), ServiceProcess(env, workdir)]
    with contextlib.ExitStack() as stack:
        # Registered before starting, so that a failed start of one still stops the other.
        for instance in instances:
            stack.callback(instance.stop)
        with ThreadPoolExecutor(max_workers=len(instances)) as pool:
            for started in pool.map(ServiceProcess.start, instances):
                assert started.port
        yield Pair(instances[0], instances[1])

