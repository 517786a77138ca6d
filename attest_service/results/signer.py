"""``ResultSigner``: signs attestation results with the current key of a directory, reloaded like the pins.

Reload: the same mechanism as the pinned trust (:class:`~attest_service.trust.reload.ReloadingVerifier`
and the gunicorn master's snapshot, :mod:`attest_service.server.master`). At most once per interval a signing
call compares a cheap fingerprint of the key files (:func:`~attest_service.results.keys.key_fingerprint`); when
it changed, the directory is loaded whole and replaces the key set in one assignment, so a result is signed
and published with the old keys or the new ones, never a mixture. A directory that fails to load keeps the
last good keys, logged once per broken content and reported to the observer. Under gunicorn the master
loads the keys too (before each fork and every interval) and a worker whose own first load fails starts on
the master's last good key set (``last_good``). :meth:`ResultSigner.request_reload` (SIGHUP to a worker)
forces a load on the next call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import urlsplit

from joserfc import jws
from joserfc.errors import UnsupportedAlgorithmError
from joserfc.jws import JWSRegistry

from attest_service.errors import ConfigurationError
from attest_service.reloading import LastGood
from attest_service.results.claims import CLAIMS, DocumentJSON, result_payload
from attest_service.results.keys import KeyFingerprint, KeySet, SigningKey, key_fingerprint, load_keys

if TYPE_CHECKING:
    from datetime import datetime

    from joserfc._rfc7515.model import JWSAlgModel

    from attest_service.callers.policy import CallerPolicy
    from attest_service.verify import VerifiedDocument

LOG: Final = logging.getLogger(__name__)

#: The issuer when none is configured: the service's default address (``serve``'s default bind). It is a
#: fixed value, never taken from a request's Host or forwarding headers, which a caller writes.
DEFAULT_ISSUER: Final = "http://127.0.0.1:8080"
#: Default lifetime of a result (``ATTEST_RESULT_TTL_SECONDS``).
DEFAULT_TTL: Final = timedelta(seconds=600)
#: Default seconds between two looks at the key directory (the pins' default; at most 30 s by contract).
DEFAULT_RELOAD_SECONDS: Final = 10.0
#: Where the JWK Set and the discovery document are served.
JWKS_PATH: Final = "/.well-known/jwks.json"
DISCOVERY_PATH: Final = "/.well-known/openid-configuration"


def _build() -> str:
    try:
        version = metadata.version("attest-service")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"attest-service {version}"


def check_issuer(issuer: str) -> str:
    """``issuer`` when it is an absolute http(s) URL without query or fragment; else ConfigurationError."""
    parts = urlsplit(issuer)
    plain = parts.netloc and "@" not in parts.netloc and not parts.query and not parts.fragment
    if parts.scheme not in ("https", "http") or not plain:
        raise ConfigurationError(f"ATTEST_RESULT_ISSUER: {issuer[:100]!r} is not an http(s) URL without query, "
                                 "fragment or user name")
    return issuer


class KeyEvents(Protocol):
    """What a :class:`ResultSigner` reports about its keys; the REST service counts these as metrics."""

    def keys_reloaded(self, *, ok: bool) -> None:
        """A changed key directory was loaded (``ok``) or failed to load (the last good keys stay)."""
        ...


class _NoKeyEvents:
    def keys_reloaded(self, *, ok: bool) -> None:
        """Ignore a reload."""


class _KeyAlgorithm(JWSRegistry):
    """A JWS registry allowing one algorithm, the key's own: ``alg`` is fixed by the key, never chosen.

    joserfc warns on each use of ``EdDSA`` (RFC 9864 prefers the curve-specific ``Ed25519``); the contract
    names ``EdDSA`` and every JOSE library in use verifies it, so the warning is not raised per result.
    """

    def __init__(self, algorithm: str) -> None:
        super().__init__(algorithms=[algorithm])
        self._algorithm = algorithm

    def get_alg(self, name: str) -> JWSAlgModel:
        """The key's algorithm model; any other name is refused."""
        if name != self._algorithm or name not in self.algorithms:
            raise UnsupportedAlgorithmError(f"Algorithm of '{name}' is not allowed")
        return self.algorithms[name]


@dataclass(frozen=True, slots=True)
class _Loaded:
    keys: KeySet
    registries: dict[str, _KeyAlgorithm]


def _loaded(keys: KeySet) -> _Loaded:
    return _Loaded(keys, {key.alg: _KeyAlgorithm(key.alg) for key in keys.keys})


@dataclass(frozen=True, slots=True)
class SignedResult:
    """One attestation result: the compact JWS and the ``kid`` of the key that signed it."""

    token: str
    kid: str


class ResultSigner:
    """Signs attestation results (compact JWS, EAR claims) with the key of a directory that sorts last.

    Build it with :meth:`from_directory`. ``issuer`` is the ``iss`` of every result and the discovery
    document's ``issuer``; ``ttl`` the lifetime of a result. Safe to share between threads. The first load
    happens in the constructor and raises ConfigurationError (a service must not start without its keys)
    unless ``last_good`` (the gunicorn master's last good key set) is given, which is then used instead.
    """

    def __init__(self, directory: Path, *, issuer: str = DEFAULT_ISSUER, ttl: timedelta = DEFAULT_TTL,
                 reload_seconds: float = DEFAULT_RELOAD_SECONDS, last_good: KeySet | None = None,
                 events: KeyEvents | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if not reload_seconds > 0:
            raise ConfigurationError("the key reload interval must be positive")
        if not ttl.total_seconds() >= 1:
            raise ConfigurationError("the lifetime of a result must be at least one second")
        self.directory = directory
        self.issuer = check_issuer(issuer)
        self.ttl = ttl
        self._ttl_seconds = int(ttl.total_seconds())
        self._events: KeyEvents = events if events is not None else _NoKeyEvents()
        self._build = _build()
        boot_failure: ConfigurationError | None = None
        fingerprint: KeyFingerprint | None
        try:
            fingerprint = key_fingerprint(directory)
            loaded = _loaded(load_keys(directory))
        except ConfigurationError as exc:
            if last_good is None:
                raise
            # No fingerprint: whatever good content the directory shows next is loaded.
            loaded, fingerprint = _loaded(last_good), None
            boot_failure = exc
        self._state: LastGood[KeyFingerprint, _Loaded] = LastGood(
            loaded, fingerprint, interval_seconds=reload_seconds, clock=clock,
            fingerprint_of=lambda: key_fingerprint(directory), load=lambda: _loaded(load_keys(directory)),
            loaded=self._reloaded, recovered=lambda: self._events.keys_reloaded(ok=True), failed=self._fail,
            screen=self._has_keys, unreadable=lambda exc: self._warn_no_key(exc.message))
        if boot_failure is not None:
            self._state.fail(boot_failure, None)

    @classmethod
    def from_directory(cls, path: str | Path, *, issuer: str = DEFAULT_ISSUER, ttl: timedelta = DEFAULT_TTL,
                       reload_seconds: float = DEFAULT_RELOAD_SECONDS) -> ResultSigner:
        """A signer over the PEM keys of directory ``path``; raises ConfigurationError when they do not load."""
        return cls(Path(path), issuer=issuer, ttl=ttl, reload_seconds=reload_seconds)

    def __repr__(self) -> str:
        return f"ResultSigner(directory={str(self.directory)!r}, issuer={self.issuer!r}, kid={self.signing_kid!r})"

    # --- keys and their reload -------------------------------------------------------------------------

    @property
    def keys(self) -> KeySet:
        """The key set in use, after reloading if the interval passed and the directory changed."""
        return self._current().keys

    def _current(self) -> _Loaded:
        return self._state.current()

    @property
    def signing_kid(self) -> str:
        """The ``kid`` of the key that signs now."""
        return self._state.value.keys.signing.kid

    @property
    def failing(self) -> bool:
        """True while the directory's current content cannot be loaded (the last good keys are in use)."""
        return self._state.failing

    def request_reload(self) -> None:
        """Load the directory again on the next call, changed or not (SIGHUP); safe in a signal handler."""
        self._state.request_reload()

    def _has_keys(self, seen: KeyFingerprint) -> bool:
        if seen:
            return True
        # No key file at all: perhaps an unmounted volume or an emptied Secret by mistake, so the last good
        # keys stay; but perhaps an operator withdrawing a compromised key, who must learn on every look
        # (not once) that it still signs.
        if not (self._state.failing and seen == self._state.failed_fingerprint):
            self._state.fail(ConfigurationError(f"ATTEST_RESULT_KEYS: {self.directory} holds no key"), seen)
        self._warn_no_key("it holds no key")
        return False

    def _reloaded(self, loaded: _Loaded, _seen: KeyFingerprint) -> None:
        self._events.keys_reloaded(ok=True)
        LOG.info("result keys reloaded from %s: %d key(s), signing with kid %s", self.directory,
                 len(loaded.keys.keys), loaded.keys.signing.kid)

    def _fail(self, exc: ConfigurationError, _seen: KeyFingerprint | None, first_time: bool) -> None:
        if first_time:
            LOG.error("result key directory %s is unusable, keeping the last good keys: %s", self.directory,
                      exc.message)
        self._events.keys_reloaded(ok=False)

    def _warn_no_key(self, why: str) -> None:
        """Log, at every look, that a directory without keys leaves the last good keys signing and published."""
        keys = self._state.value.keys
        LOG.error("result key directory %s has no usable key (%s): results are still signed with kid %s and the "
                  "JWK Set still publishes %s. To withdraw a compromised key, add a new key first "
                  "(attest-service keys new %s), then remove the compromised one; to stop issuing results, set "
                  "ATTEST_RESULT_KEYS=off and restart", self.directory, why, keys.signing.kid,
                  ", ".join(key.kid for key in keys.keys), self.directory)

    # --- what is signed and published ------------------------------------------------------------------

    def sign(self, document: VerifiedDocument, *, caller: CallerPolicy, at: datetime,
             shared: DocumentJSON | None = None) -> SignedResult:
        """The attestation result for ``document``, accepted for ``caller`` at ``at`` (timezone-aware).

        ``shared`` is the document's :class:`~attest_service.results.claims.DocumentJSON` when the verify
        answer built it already; its encoded claims and signer go into the result as they are.
        """
        loaded = self._current()
        key: SigningKey = loaded.keys.signing
        payload = result_payload(document, caller=caller, issuer=self.issuer, at=at, ttl_seconds=self._ttl_seconds,
                                 verifier_build=self._build, shared=shared)
        # joserfc encodes the protected header and the payload, signs and serialises; the header is a new dict
        # per call because joserfc may write a kid into it.
        token = jws.serialize_compact({"alg": key.alg, "kid": key.kid, "typ": "JWT"}, payload, key.jose_key,
                                      registry=loaded.registries[key.alg])
        return SignedResult(token=token, kid=key.kid)

    def jwks(self) -> dict[str, object]:
        """The JWK Set: the public part of every key of the directory."""
        return self.keys.jwks()

    def discovery(self) -> dict[str, object]:
        """The OpenID Provider metadata relying parties discover the keys and claims by."""
        algorithms = sorted({key.alg for key in self.keys.keys})
        return {
            "issuer": self.issuer,
            "jwks_uri": self.issuer.rstrip("/") + JWKS_PATH,
            "id_token_signing_alg_values_supported": algorithms,
            "subject_types_supported": ["public"],
            "response_types_supported": ["id_token"],
            "claims_supported": list(CLAIMS),
        }
