"""Gunicorn configuration of the service: ``attest-service serve``, ``make run`` and the container use it.

Cooperative workers (gevent): a connection waiting on a slow client or a hung nonce store costs a
greenlet, not a thread. With threaded workers, 100 clients sending their bodies a byte a second held every
thread and nobody else was served, and requests queued behind a frozen Redis well past the store timeout
(docs/RELIABILITY.md has both measurements). Verification is CPU work done one request at a time per
worker (its cost: docs/DEPLOYMENT.md, "Sizing"); run one worker per core. ``serve`` passes ``--bind`` and ``--workers``,
which override the defaults here.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any, Final

from prometheus_client import multiprocess

from attest_service.callers import throttle
from attest_service.server import crl_refresh, master
from attest_service.settings import Settings

#: The table of sources blocked for failed authentication, made here in the master before it forks, so that
#: its workers share it (callers/throttle.py).
_BLOCKED_SOURCES: Final = throttle.SHARED_BLOCKS

wsgi_app: Final = "attest_service.web:create_app()"
bind: Final = ["127.0.0.1:8080"]
workers: Final = 2
#: gunicorn's gevent worker, sharing new connections out evenly over the workers (server/workers.py).
worker_class: Final = "attest_service.server.workers.GeventWorker"
#: Connections one worker holds open at once (slow clients included); beyond it the kernel queues them.
worker_connections: Final = 1000
#: Seconds a worker may be silent before the master restarts it.
timeout: Final = 30
#: Seconds a worker gets to finish its requests on shutdown or restart.
graceful_timeout: Final = 20
#: Seconds an idle keep-alive connection is held open (clients reuse connections for challenge + verify).
keepalive: Final = 5
#: Bytes of a request line: the API's paths are short; a long line is an attack or a mistake.
limit_request_line: Final = 4096
#: Header fields per request, and bytes per header field.
limit_request_fields: Final = 64
limit_request_field_size: Final = 8190

# Access lines as JSON on standard output; errors on standard error (twelve-factor style, for containers).
accesslog: Final = "-"
errorlog: Final = "-"
logger_class: Final = "attest_service.server.access_log.JsonAccessLogger"
loglevel: Final = (os.environ.get("ATTEST_LOG_LEVEL") or "info").lower()

# The workers' heartbeat files belong in memory: a disk-backed /tmp can stall them and get workers killed.
# gunicorn 27 opens an administration socket under $HOME by default; the service needs none, and in the
# container HOME is not writable.
control_socket_disable: Final = True
worker_tmp_dir: Final = "/dev/shm" if Path("/dev/shm").is_dir() else None  # noqa: S108 - tmpfs, by design

#: File names prometheus-client writes in PROMETHEUS_MULTIPROC_DIR.
_METRIC_FILE: Final = re.compile(r"(counter|gauge_[a-z]+|gauge|histogram|summary)_\d+\.db")


def on_starting(server: Any) -> None:  # noqa: ANN401, ARG001 - gunicorn's hook signature
    """Remove metric files of a previous run, so counters start from zero with the new master."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    for path in Path(directory).iterdir():
        if _METRIC_FILE.fullmatch(path.name):
            path.unlink(missing_ok=True)


def _sockets(server: Any) -> list[socket.socket]:  # noqa: ANN401 - gunicorn's arbiter
    return [listener.sock for listener in server.LISTENERS]


def when_ready(server: Any) -> None:  # noqa: ANN401 - gunicorn's hook signature
    """Load trust and policy in the master, then again every ``ATTEST_TRUST_RELOAD_SECONDS``.

    Raises (and so stops the master) when they do not load now; later loads keep the last good snapshot
    for what fails (:mod:`attest_service.server.master`).
    """
    snapshot_settings = Settings.from_env()
    master.refresh(_sockets(server))
    master.refresh_periodically(lambda: _sockets(server), snapshot_settings.trust_reload_seconds)
    crl_refresh.start(snapshot_settings)


def on_exit(server: Any) -> None:  # noqa: ANN401, ARG001 - gunicorn's hook signature
    """Stop the CRL refresher (:mod:`attest_service.server.crl_refresh`) with the master."""
    crl_refresh.stop()


def pre_fork(server: Any, worker: Any) -> None:  # noqa: ANN401, ARG001 - gunicorn's hook signature
    """Load trust and policy in the master before each fork, so the worker inherits the newest good snapshot."""
    master.refresh(_sockets(server))


def post_fork(server: Any, worker: Any) -> None:  # noqa: ANN401, ARG001 - gunicorn's hook signature
    """In the new worker: the master's refresh timer handler is not the worker's business."""
    master.stop_refreshing()
    crl_refresh.forget()


def child_exit(server: Any, worker: Any) -> None:  # noqa: ANN401, ARG001 - gunicorn's hook signature
    """Forget a worker that is gone: its slot in the connection counts, its live gauges.

    The slot is freed for the next worker (:mod:`attest_service.server.workers`); prometheus-client stops
    reporting the worker's live gauges.
    """
    release = getattr(worker, "release_connection_slot", None)
    if callable(release):
        release()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def post_worker_init(worker: Any) -> None:  # noqa: ANN401 - gunicorn's hook signature
    """SIGHUP to a worker reloads its pinned trust, policy and result keys on the next request.

    Everything loaded so far (modules, trust, the application) is moved out of the collector's sight with
    ``gc.freeze()``: a full collection then walks only what requests allocate, and its pause, during which
    the worker answers nobody, all but vanishes (docs/DEPLOYMENT.md, "Figures behind the code").
    """
    gc.freeze()
    app = getattr(worker, "wsgi", None)
    service = getattr(app, "extensions", {}).get("attest_service")
    # The ReloadingVerifier is the attestation step's verifier (web.app.document_verifier); the result signer,
    # when results are on, and the access policy (web.service.Service.policies) reload the same way.
    attestor = getattr(service, "attestor", None)
    reloads = [reload for reload in (getattr(getattr(attestor, "verifier", None), "request_reload", None),
                                     getattr(getattr(attestor, "results", None), "request_reload", None),
                                     getattr(getattr(service, "policies", None), "request_reload", None))
               if callable(reload)]
    if reloads:
        signal.signal(signal.SIGHUP, lambda _signum, _frame: [reload() for reload in reloads])


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:  # noqa: ANN401, ARG001 - gunicorn's hook
    """Let the worker's other connections run, new requests included, before this one's next request.

    A gevent greenlet gives up its worker only when a read would block. A keep-alive client whose next
    request is already waiting, talking to a Redis whose answer is already there, can so keep the worker
    for many requests in a row while every other connection of that worker waits; yielding after each
    answer serves the connections in turn (the latency tail it removed: docs/DEPLOYMENT.md, "Sizing").

    The yield waits for the loop's next iteration (a timer), not for the callback queue (``sleep(0)``).
    gevent resumes ``sleep(0)`` greenlets before it polls for I/O again and only checks the clock every
    50 callbacks: busy connections then took turns for up to 50 requests while a request on a quiet
    connection sat unread, as the access log showed. With the timer the loop polls once per round, at the
    same throughput (same section). Under other worker classes nothing is done.
    """
    if worker_class_is_gevent(worker):
        # gevent is the worker's own library, loaded once the worker class is (never in the master first).
        import gevent  # type: ignore[import-untyped]  # noqa: PLC0415

        gevent.sleep(_NEXT_LOOP_ITERATION)


#: Any delay above zero: gevent then resumes the greenlet from a timer, after the loop's next I/O poll.
#: (Under gevent's libuv loop, GEVENT_LOOP=libuv, timers are rounded up to 1 ms; the shipped loop is libev.)
_NEXT_LOOP_ITERATION: Final = 1e-6


def worker_class_is_gevent(worker: Any) -> bool:  # noqa: ANN401 - gunicorn's worker
    """Whether ``worker`` is one of gunicorn's gevent workers or derives from one (the shipped class does)."""
    worker_class: type[Any] = type(worker)
    known = _GEVENT_CLASSES.get(worker_class)
    if known is None:
        known = _GEVENT_CLASSES[worker_class] = any(
            cls.__module__.startswith("gunicorn.workers.ggevent") for cls in worker_class.__mro__)
    return known


#: The answer for each worker class asked about: it is asked after every request, and never changes.
_GEVENT_CLASSES: Final[dict[type[Any], bool]] = {}
