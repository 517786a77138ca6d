"""The baseline of the HTTP benchmarks: a bare Flask app that parses the posted JSON and answers a small JSON.

It stands for the least any Python WSGI service must do per request (HTTP parsing, routing, JSON in and out),
so ``POST /v1/verify``'s rate over this app's rate is the share of a request the service's own work leaves.
Loaded by gunicorn as ``echo_app:create_app()`` with ``--pythonpath benchmarks``.
"""

from __future__ import annotations

import json

from flask import Flask, Response, jsonify, request

PATH = "/v1/verify"


def create_app() -> Flask:
    """A Flask app answering ``POST /v1/verify`` with the size of the posted signature, and ``GET /healthz``."""
    app = Flask("echo")

    @app.post(PATH)
    def echo() -> Response:
        body = json.loads(request.get_data())
        document = body.get("document") or {}
        return jsonify({"verified": True, "size": len(document.get("signature", ""))})

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    return app
