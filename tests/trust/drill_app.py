"""The service's application with an AIA fetcher that may reach the rotation drill's CA server on loopback.

gunicorn loads ``tests.trust.drill_app:create_app()`` in place of ``attest_service.web:create_app()`` (the
same settings from the environment, the same gunicorn configuration module); only the fetcher differs.
The production fetcher refuses loopback, by design and by no setting, and the drill may not reach the
internet, so the drill's "allow-listed URL" is ``http://127.0.0.1:$ATTEST_DRILL_AIA_PORT/pkiops/certs/``.
"""

from __future__ import annotations

import os

from flask import Flask

from attest_service.trust.aia import AiaFetcher, AiaPolicy, AllowRule
from attest_service.web.app import create_app as create_service_app

#: The variable naming the port of the drill's CA server.
PORT_VARIABLE = "ATTEST_DRILL_AIA_PORT"
#: The path prefix the drill's CA server publishes under (Microsoft's, for realism).
PATH_PREFIX = "/pkiops/certs/"


def create_app() -> Flask:
    """The service, its AIA fallback allowed to fetch from the drill's CA server only."""
    rule = AllowRule(scheme="http", host="127.0.0.1", port=int(os.environ[PORT_VARIABLE]), path_prefix=PATH_PREFIX)
    fetcher = AiaFetcher(AiaPolicy(allow={"public": (rule,)}), allow_address=lambda address: address.is_loopback)
    return create_service_app(aia=fetcher)
