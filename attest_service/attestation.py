"""Step 10, the caller's step: verify a document, apply the caller's allow-lists, then claim its nonce once.

The verification core (:mod:`attest_service.verify`) proves a document genuine; this module turns that into
the product's guarantee, *each nonce is accepted once, ever*, without any web framework:

1. verify the document with the core, at the caller's instant (steps 1 to 9);
2. check the caller's allow-lists (:class:`~attest_service.callers.policy.CallerPolicy`): a genuine document
   outside them is refused with ``policy_denied`` and keeps its nonce;
3. claim the nonce in the nonce store (:class:`~attest_service.nonces.NonceStore`), atomically, only now
   that everything above passed, so junk or a denied document can never burn a nonce;
4. sign the attestation result (:mod:`attest_service.results`) when a signer is given: only now, after the
   claim succeeded, so that a refused, replayed or unrecorded document (409, 503) never carries one;
5. report what was accepted.

The REST service's views (:mod:`attest_service.web.routes`) are this object behind HTTP; a license server
written in Python embeds it directly (README, "Embedding"). It also issues the challenges it later consumes.
"""

from __future__ import annotations

import re
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final, Protocol

from attest_service.callers.policy import CallerPolicy
from attest_service.clouds import AUTO
from attest_service.errors import NonceMismatch, NonceReplayed
from attest_service.nonces.failures import StoreErrorEvents, store_errors_reported
from attest_service.nonces.store import CACHED_DOCUMENT_HINT, DEFAULT_CHALLENGE_TTL_SECONDS, NonceStore
from attest_service.results.claims import JSON_ENCODER, DocumentJSON
from attest_service.verify import (
    DEFAULT_CLOCK_SKEW,
    DEFAULT_REVOCATION,
    RevocationMode,
    VerificationPolicy,
    VerifiedDocument,
    aware_instant,
)

if TYPE_CHECKING:
    from attest_service.results import ResultSigner

#: Bytes of randomness in a challenge: 144 bits, 24 URL-safe base64 characters (IMDS allows 32).
CHALLENGE_BYTES: Final = 18
#: A challenge as :func:`secrets.token_urlsafe` writes it; safe in IMDS's ``nonce`` query parameter.
CHALLENGE_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{24}")
#: Issuing retries on the (astronomically unlikely) collision with a live challenge.
CHALLENGE_ATTEMPTS: Final = 3
#: The client id recorded for a caller that names none (an embedding application with one tenant).
DEFAULT_CLIENT_ID: Final = "default"


class VerifierProtocol(Protocol):
    """The verification core as the attestation step uses it: a DocumentVerifier or a ReloadingVerifier."""

    def decode(self, response: Mapping[str, object] | str | bytes) -> bytes:
        """The DER of what a caller holds (:func:`~attest_service.verify.decode`); raise MalformedDocument."""
        ...

    def verify(self, der: bytes, *, policy: VerificationPolicy, now: datetime) -> VerifiedDocument:
        """Verify DER ``der`` at ``now``; raise a VerificationError subclass when it fails."""
        ...


class AttestationEvents(StoreErrorEvents, Protocol):
    """What an :class:`Attestor` reports as it works; the REST service counts these as metrics."""

    def nonce_accepted(self, *, challenge: bool) -> None:
        """A nonce was accepted; ``challenge`` tells whether it consumed a service-issued challenge."""
        ...

    def challenge_issued(self) -> None:
        """A challenge was issued."""
        ...

    def result_issued(self, kid: str) -> None:
        """An attestation result was signed with the key ``kid``."""
        ...


def _instant(at: datetime | None, now: datetime | None) -> datetime:
    """The instant of a call: ``at`` (default: the system clock); ``now`` is its former, deprecated name."""
    if now is not None:
        warnings.warn("the now= argument is deprecated; name the instant at=", DeprecationWarning, stacklevel=3)
        if at is not None:
            raise TypeError("give the instant as at= only, not also as now=")
        at = now
    return datetime.now(UTC) if at is None else aware_instant(at)


class _NoEvents:
    """The default observer: reports go nowhere."""

    def store_error(self, operation: str) -> None:
        """Ignore a store failure (it is raised to the caller all the same)."""

    def nonce_accepted(self, *, challenge: bool) -> None:
        """Ignore an acceptance."""

    def challenge_issued(self) -> None:
        """Ignore an issued challenge."""

    def result_issued(self, kid: str) -> None:
        """Ignore an issued result."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge:
    """A single-use nonce issued to one client, for IMDS to sign, live until ``expires_at``."""

    nonce: str
    expires_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Attested:
    """A document that was verified, admitted by the caller's allow-lists, and whose nonce is now spent."""

    document: VerifiedDocument
    #: Whether the caller named the nonce it expected (and the core compared it).
    nonce_checked: bool
    #: Whether the nonce consumed a challenge this service issued (else it was a caller-chosen nonce).
    challenge: bool
    #: The attestation result (compact JWS), when the attestor has a :class:`~attest_service.results.ResultSigner`.
    token: str | None = None
    #: The document's answer and its encoded claims and signer, when already built (the result shares them).
    shared: DocumentJSON | None = None

    def to_dict(self) -> dict[str, object]:
        """The REST service's success body: the verdict, what was accepted of the nonce, and the ``token``."""
        payload = dict(self.shared.answer) if self.shared is not None else self.document.to_dict()
        payload["nonce"] = {"value": self.document.claims.nonce, "checked": self.nonce_checked,
                            "challenge": self.challenge}
        if self.token is not None:
            payload["token"] = self.token
        return payload

    def to_json(self) -> bytes:
        """:meth:`to_dict` as the API writes it: compact ASCII JSON and a newline, the same bytes as encoding it.

        With a :class:`DocumentJSON` (results on), the claims and signer are the text encoded once for the
        result and the answer. The token goes in as it is: a compact JWS is base64url segments joined by dots,
        which JSON never escapes.
        """
        shared = self.shared
        if shared is None:  # nothing to share: one encoding of the whole answer costs least
            return (JSON_ENCODER.encode(self.to_dict()) + "\n").encode("ascii")
        encode = JSON_ENCODER.encode
        token = "" if self.token is None else f',"token":"{self.token}"'
        text = (f'{{"verified":true,"cloud":{encode(self.document.cloud)},"claims":{shared.claims},'
                f'"signer":{shared.signer},"nonce":{{"value":{encode(self.document.claims.nonce)},'
                f'"checked":{"true" if self.nonce_checked else "false"},'
                f'"challenge":{"true" if self.challenge else "false"}}}{token}}}\n')
        return text.encode("ascii")


class Attestor:
    """Verify, admit and accept attested documents once each, against one nonce store.

    Safe to share between threads (the verifier and the stores are). ``clock_skew`` is the tolerance the
    core applies to the document's validity window; ``challenge_ttl`` is how long an issued challenge lives,
    and the least time any accepted nonce is remembered. With ``results`` each accepted document also gets
    a signed attestation result (``Attested.token``).
    """

    def __init__(self, verifier: VerifierProtocol, store: NonceStore, *,
                 clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
                 challenge_ttl: timedelta = timedelta(seconds=DEFAULT_CHALLENGE_TTL_SECONDS),
                 events: AttestationEvents | None = None, revocation: RevocationMode = DEFAULT_REVOCATION,
                 results: ResultSigner | None = None) -> None:
        self.verifier = verifier
        #: The signer of attestation results; None: results are off.
        self.results = results
        self.store = store
        self.clock_skew = clock_skew
        #: The revocation mode of step 6 (``ATTEST_REVOCATION``): ``soft``, ``hard`` or ``off``.
        self.revocation = revocation
        self.challenge_ttl = challenge_ttl
        self._events: AttestationEvents = events if events is not None else _NoEvents()

    def issue_challenge(self, *, client_id: str = DEFAULT_CLIENT_ID, at: datetime | None = None,
                        now: datetime | None = None) -> Challenge:
        """Issue a fresh challenge to ``client_id``; raises StoreUnavailable when the store cannot record it.

        ``at``, a timezone-aware instant (default: the system clock), starts the challenge's lifetime; a
        naive one is a ValueError, anything else a TypeError. ``now`` is a deprecated name for ``at``.
        """
        now = _instant(at, now)
        expires_at = now + self.challenge_ttl
        for attempt in range(CHALLENGE_ATTEMPTS):
            nonce = secrets.token_urlsafe(CHALLENGE_BYTES)
            try:
                with store_errors_reported(self._events, "issue_challenge"):
                    self.store.issue_challenge(nonce, client_id=client_id, expires_at=expires_at, now=now)
                break
            except NonceReplayed:
                if attempt + 1 == CHALLENGE_ATTEMPTS:
                    raise
        self._events.challenge_issued()
        return Challenge(nonce=nonce, expires_at=expires_at)

    def attest(self, response: Mapping[str, object] | str | bytes, *, nonce: str | None = None, cloud: str = AUTO,
               caller: CallerPolicy | None = None, at: datetime | None = None,
               now: datetime | None = None) -> Attested:
        """Verify ``response`` (any form :func:`~attest_service.verify.decode` takes) and accept its nonce.

        ``nonce`` is the nonce the caller expects (a challenge it was issued, or its own); ``caller`` holds
        the caller's allow-lists and client id (default: one unrestricted client); ``at`` is the
        timezone-aware instant of the verification (default: the system clock; ``now`` is its deprecated
        name). Raises a :class:`~attest_service.errors.VerificationError` subclass, ``PolicyDenied``,
        ``NonceReplayed``, ``NonceUnknown`` or ``StoreUnavailable``; on any of them nothing was accepted. A
        wrong argument (a naive or non-datetime ``at``, an unknown ``cloud``) is a TypeError or ValueError.
        """
        instant = _instant(at, now)
        return self.attest_der(self.verifier.decode(response), nonce=nonce, cloud=cloud, caller=caller, at=instant)

    def attest_der(self, der: bytes, *, nonce: str | None = None, cloud: str = AUTO,
                   caller: CallerPolicy | None = None, at: datetime | None = None,
                   now: datetime | None = None) -> Attested:
        """:meth:`attest` for a document already decoded to DER."""
        now = _instant(at, now)
        policy = caller if caller is not None else CallerPolicy.unrestricted(DEFAULT_CLIENT_ID)
        # Steps 1 to 9: the verification core.
        verified = self._verify(der, nonce=nonce, cloud=cloud, now=now)
        # The caller's allow-lists, before the claim: a denied document keeps its nonce.
        policy.check(verified)
        # Step 10: claim the nonce, only now that the document is genuine and admitted.
        challenge = self._claim(verified, policy, now)
        # Step 11: the attestation result, only for a nonce that is now spent.
        token = None
        shared = None
        if self.results is not None:
            # The document's answer and its encoded claims and signer, built once for the result and the answer.
            shared = DocumentJSON.of(verified)
            signed = self.results.sign(verified, caller=policy, at=now, shared=shared)
            self._events.result_issued(signed.kid)
            token = signed.token
        return Attested(document=verified, nonce_checked=nonce is not None, challenge=challenge, token=token,
                        shared=shared)

    def _verify(self, der: bytes, *, nonce: str | None, cloud: str, now: datetime) -> VerifiedDocument:
        policy = VerificationPolicy(cloud=cloud, expected_nonce=nonce, clock_skew=self.clock_skew,
                                    revocation=self.revocation)
        try:
            return self.verifier.verify(der, policy=policy, now=now)
        except NonceMismatch as exc:
            # Step 9 is the core's last: the document is otherwise genuine, so its signed nonce (the core's, not
            # a second verification, which would count the refused document as verified) can tell a VM that
            # IMDS handed back a cached document fetched for one of our earlier challenges.
            signed = exc.signed_nonce
            if signed is not None and CHALLENGE_PATTERN.fullmatch(signed):
                raise NonceMismatch(f"the signed nonce {signed!r} is not the expected one {nonce!r}: "
                                    f"it is an earlier challenge; {CACHED_DOCUMENT_HINT}") from exc
            raise

    def _claim(self, verified: VerifiedDocument, caller: CallerPolicy, now: datetime) -> bool:
        claims = verified.claims
        # A seen nonce is remembered while its document could still verify (expiry plus skew), and at least
        # one challenge lifetime, so a challenge can never be accepted again while it could be reissued.
        expires_at = max(claims.expires_on + self.clock_skew, now + self.challenge_ttl)
        # A caller-chosen nonce is claimed for the VM Azure signed the document for: a tenant presenting its
        # own VMs' documents first cannot burn the (often predictable) nonces of another tenant's VMs, and a
        # captured document still names its VM, so it is refused to everyone. A challenge is claimed once,
        # whatever the VM (see NonceStore.accept). A document without a vmId is claimed without a scope.
        with store_errors_reported(self._events, "accept"):
            acceptance = self.store.accept(claims.nonce, client_id=caller.client_id, expires_at=expires_at,
                                           require_challenge=caller.require_challenge, now=now,
                                           scope=claims.vm_id or None)
        self._events.nonce_accepted(challenge=acceptance.challenge)
        return acceptance.challenge


__all__ = [
    "CHALLENGE_PATTERN",
    "AttestationEvents",
    "Attested",
    "Attestor",
    "Challenge",
    "VerifierProtocol",
]
