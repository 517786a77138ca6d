"""Helpers shared by the test suites: launchers of real dependencies (see :mod:`tests.support.redis_server`)."""
