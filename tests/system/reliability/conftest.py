"""Shared fixtures of the reliability tests: they need redis-server and start real processes."""

from __future__ import annotations

from tests.support import tools

requires_redis = tools.requires_redis
