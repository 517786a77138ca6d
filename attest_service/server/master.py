"""What the gunicorn master keeps for the workers it forks: the last good trust and policy, and its sockets.

Why: a worker that died while the mounted files were broken could not boot again from them, gunicorn
halts when a worker fails to boot, and the pod would crash-loop. So the master loads both too, before each
fork (``pre_fork``, :mod:`attest_service.server.gunicorn_conf`) and every ``ATTEST_TRUST_RELOAD_SECONDS``,
and its workers inherit the last good load through ``fork`` (:func:`refresh`). Nothing here creates a
metric: the master must write no prometheus-client files (see the web package).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from attest_service.callers.policy import AccessPolicy, load_policy
from attest_service.errors import ConfigurationError
from attest_service.results import KeyFingerprint, KeySet, ensure_generated_key, key_fingerprint, load_keys
from attest_service.settings import Settings
from attest_service.trust import TrustStore, load_trust
from attest_service.trust.loading import Fingerprint, directory_fingerprint

LOG: Final = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """The master's last good trust and access policy, and whether it listens on loopback only."""

    trust: TrustStore
    access: AccessPolicy
    loopback_only: bool
    #: The pinned directory and its fingerprint when ``trust`` was loaded from it (None: not known).
    trust_source: tuple[str, Fingerprint] | None = None
    #: The last good result-signing keys (None: results are off), and what they were loaded from.
    result_keys: KeySet | None = None
    result_keys_source: tuple[str, KeyFingerprint] | None = None


_current: Snapshot | None = None
#: Set while :func:`refresh` runs, so that the timer cannot start a second one inside it.
_refreshing = False


#: What the loopback open mode takes for granted, said in its warning.
LOOPBACK_ASSUMPTION: Final = ("this assumes nothing on this host forwards requests to it: a reverse proxy on this "
                              "host that adds no X-Forwarded-For or Forwarded header makes every caller look local "
                              "and opens the service to whoever reaches the proxy")


def inherited() -> Snapshot | None:
    """The snapshot this process received from the gunicorn master; None outside gunicorn."""
    return _current


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address as a socket reports it) is a loopback address; names are not."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def loopback_only(sockets: Iterable[socket.socket]) -> bool:
    """Whether every one of ``sockets`` (at least one) is bound to a loopback address.

    A Unix socket or an inherited descriptor counts as reachable from anywhere: a proxy may forward to it.
    """
    found = False
    for sock in sockets:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or not is_loopback(str(sock.getsockname()[0])):
            return False
        found = True
    return found


def open_access(settings: Settings, *, loopback: bool) -> bool:
    """Whether keyless callers may use their own nonces: opted in, or no keys, no policy file and loopback.

    The open mode accepts any captured document once; anywhere but on loopback, keyless callers must present
    service-issued challenges unless ``ATTEST_ALLOW_OPEN=1`` says otherwise.

    Trusted proxies say that the loopback socket is a proxy's upstream, reachable from anywhere through it:
    then loopback alone does not open the service.
    """
    return settings.allow_open or (loopback and not settings.api_keys and settings.policy_file is None
                                   and not settings.trusted_proxies)


def access_policy(settings: Settings, *, loopback: bool) -> AccessPolicy:
    """The access policy ``settings`` describe for a service that listens on loopback only, or not.

    Raises ConfigurationError for an unreadable or invalid policy file.
    """
    return load_policy(settings.policy_file, api_clients=frozenset(settings.api_keys),
                       open_access=open_access(settings, loopback=loopback))


def load_pinned(settings: Settings) -> TrustStore:
    """The pinned trust of ``settings``; raises ConfigurationError when it does not load or pins nothing."""
    trust = load_trust(settings.pinned_certs)
    if not any(True for _ in trust.all_pins()):
        # The same refusal as the workers' reload: an empty mount would otherwise trust nothing, silently.
        raise ConfigurationError(f"{settings.pinned_certs}: no pinned certificate at all")
    return trust


#: The failure last logged per file kind, so that the timer logs a broken file once, not every interval.
_logged: dict[str, str] = {}


def _or_previous(load: Callable[[], _T], previous: _T | None, kind: str, what: str) -> _T:
    """``load()``, or ``previous`` (logged) when it raises ConfigurationError; raises when there is none."""
    try:
        loaded = load()
    except ConfigurationError as exc:
        if previous is None:
            raise
        failure = exc
    else:
        _logged.pop(kind, None)
        return loaded
    if _logged.get(kind) != failure.message:
        _logged[kind] = failure.message
        LOG.error("%s is unusable; workers started from now on serve the one loaded before: %s", what,
                  failure.message)
    return previous


def _pinned_source(settings: Settings) -> tuple[str, Fingerprint] | None:
    try:
        return str(settings.pinned_certs), directory_fingerprint(settings.pinned_certs)
    except ConfigurationError:
        return None  # the load that follows reports it


def default_key_ready(settings: Settings) -> bool:
    """Make the embedded default's one key if its directory has none; False (logged) when that fails.

    The default key lives beside the SQLite store, so a state directory that cannot be written fails the
    store too, and the service reports that through ``/readyz``, as before results existed: it starts, with
    results off, rather than not at all.
    """
    assert settings.result_keys is not None  # noqa: S101 - the caller checked; narrows the type
    try:
        ensure_generated_key(settings.result_keys)
    except ConfigurationError as exc:
        failure = exc
    else:
        return True
    LOG.error("attestation results are off: %s", failure.message)
    return False


def log_results_state(settings: Settings) -> None:
    """Say once, at start, when attestation results are off and why."""
    if settings.result_keys is not None:
        return
    if settings.nonce_store_url.startswith("sqlite:///"):
        LOG.info("attestation results are off (ATTEST_RESULT_KEYS=off)")
    else:
        LOG.warning("attestation results are off: the nonce store is shared and ATTEST_RESULT_KEYS names no key "
                    "directory (every replica must sign with the same keys); /v1/verify answers no token")


KeySource = tuple[str, KeyFingerprint]


def _result_keys(settings: Settings, previous: Snapshot | None) -> tuple[KeySet | None, KeySource | None]:
    """The result keys of ``settings`` (None: results off), loaded as the pins are: only when changed."""
    directory = settings.result_keys
    if directory is None:
        return None, None
    if settings.result_keys_generated:
        # At the first start, in the master, before any worker exists: one key, generated once and kept. When
        # it cannot be made, results stay off for the master's life, and its workers see that in the snapshot.
        if previous is None and not default_key_ready(settings):
            return None, None
        if previous is not None and previous.result_keys is None:
            return None, None
    try:
        source: KeySource | None = (str(directory), key_fingerprint(directory))
    except ConfigurationError:
        source = None  # the load that follows reports it
    old = previous.result_keys if previous is not None else None
    if previous is not None and source is not None and source == previous.result_keys_source:
        _logged.pop("keys", None)  # back to the files loaded last: a later breakage is news again
        return old, source
    keys = _or_previous(lambda: load_keys(directory), old, "keys", f"result key directory {directory}")
    if previous is not None and keys is old:
        source = previous.result_keys_source  # the load failed: the keys kept are still the old files'
    return keys, source


def refresh(sockets: Iterable[socket.socket], env: Mapping[str, str] | None = None) -> Snapshot:
    """Load trust and policy again (in the master, before a fork) and keep what loaded; return the snapshot.

    Each worker reads the pinned directory and the policy file itself when it boots
    (:func:`attest_service.web.create_app`); a worker whose own load fails serves with this snapshot and
    reports the failure through the trust reload metrics. Because the master keeps loading, a worker
    respawned after a later good change and a breakage gets the newer good files.

    Each part that fails keeps its last good value and is logged. Raises ConfigurationError only when there
    is no earlier snapshot to keep: a master that never loaded its files must not start workers. The pinned
    directory is loaded again only when its fingerprint changed since the last good load, as in the workers
    (:func:`attest_service.trust.loading.directory_fingerprint`), which costs the master's CPU a small part
    of a load at every interval (docs/DEPLOYMENT.md, "Figures behind the code").
    """
    global _current, _refreshing  # noqa: PLW0603 - the one snapshot of the process, inherited by its workers
    settings = Settings.from_env(env)
    loopback = loopback_only(sockets)
    previous = _current
    _refreshing = True
    try:
        # Taken before the load: a change made during the load shows at the next refresh.
        source = _pinned_source(settings)
        if previous is not None and source is not None and source == previous.trust_source:
            trust = previous.trust
            _logged.pop("trust", None)  # back to the files loaded last: a later breakage is news again
        else:
            trust = _or_previous(lambda: load_pinned(settings), previous.trust if previous else None, "trust",
                                 f"pinned directory {settings.pinned_certs}")
            if previous is not None and trust is previous.trust:
                source = previous.trust_source  # the load failed: the trust kept is still the old files'
        access = _or_previous(lambda: access_policy(settings, loopback=loopback),
                              previous.access if previous else None, "policy", "policy file")
        result_keys, keys_source = _result_keys(settings, previous)
    finally:
        _refreshing = False
    if previous is None and open_access(settings, loopback=loopback):
        # Said once, by the master: the open mode accepts any captured document once, first come first served.
        # Loopback only means "callers on this machine" only while nothing on the machine forwards to the
        # socket: a reverse proxy here that adds no X-Forwarded-For or Forwarded header makes every caller
        # look local, and the open mode then serves the whole network.
        why = ("ATTEST_ALLOW_OPEN=1" if settings.allow_open else
               f"the service listens on loopback only; {LOOPBACK_ASSUMPTION}")
        LOG.warning("no API keys and no policy file: callers need no key and may use their own nonces (%s); "
                    "set ATTEST_API_KEYS or ATTEST_POLICY_FILE before exposing the service", why)
    if previous is None:
        log_results_state(settings)
    _current = Snapshot(trust=trust, access=access, loopback_only=loopback, trust_source=source,
                        result_keys=result_keys, result_keys_source=keys_source)
    return _current


def forget() -> None:
    """Drop the snapshot and the failures logged: this process is again one that has loaded nothing."""
    global _current  # noqa: PLW0603 - the one snapshot of the process
    _current = None
    _logged.clear()


def refresh_periodically(sockets: Callable[[], Iterable[socket.socket]], interval_seconds: float) -> None:
    """In the master: :func:`refresh` every ``interval_seconds`` on the main thread, from a SIGALRM timer.

    gunicorn uses neither the timer nor the signal. A thread would risk holding a lock at the instant of a
    fork, which the child could then never take. Timers are not inherited by forked children, and the
    workers put the handler back to the default.
    """

    def on_alarm(_signum: int, _frame: object) -> None:
        if _refreshing:
            return
        try:
            refresh(sockets())
        except Exception:  # raised in a signal handler, it would stop gunicorn's master anywhere
            LOG.exception("reloading the pinned directory and policy file in the master failed")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, interval_seconds, interval_seconds)


def stop_refreshing() -> None:
    """In a forked worker: no timer was inherited; put the master's SIGALRM handler back to the default."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
