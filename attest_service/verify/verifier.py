"""The verification core: bytes, a policy, trust material and an instant in; a frozen result out.

Algorithm (each step is marked ``Step N`` in the code, and its module cites its source):

1. Decode the caller's input to DER (document.py; IMDS "Attested data": base64 PKCS7).
2. Parse ContentInfo/SignedData strictly as DER (pkcs7.py; RFC 5652 sections 3 and 5, X.690 10).
3. Resolve the signer: the one certificate the SignerInfo's ``sid`` names (RFC 5652 5.3), never "the
   first certificate".
4. Verify the signature under that certificate's key, with signed attributes when present
   (signature.py; RFC 5652 5.4-5.6).
5. Check the signer's name against the cloud's metadata domain; with ``auto``, pick the cloud from it
   (names.py; IMDS "Attested data", RFC 6125).
6. Build and validate the path through pinned intermediates to a root of that cloud at the
   instant (chain.py; RFC 5280 6). Certificates carried in the document are never path candidates.
   When a path exists but only at other instants (``certificate_expired``), steps 7 and 8 are looked at
   before that is reported: a document whose own window has passed (or not begun) beyond the skew is
   refused ``document_expired`` (``document_not_yet_valid``) instead. Both hold for every old document
   verified now, and the document's window, hours long, lies inside its signer's validity: it is the first
   thing that went wrong, and the one a caller acts on (fetch a fresh document), where
   ``certificate_expired`` on a document still inside its window points at the pins or the clock.
   Then look every certificate on the path but the root up in its issuer's current CRL, as the policy's
   revocation mode says (revocation.py; RFC 5280 6.3).
7. Parse the signed content (claims.py; IMDS "Attested data").
8. Check the validity window ``createdOn``/``expiresOn`` against the instant, within the clock skew.
9. Compare the signed nonce with the expected one, when the caller gives one.
10. (The caller's step, not done here) claim the nonce in the nonce store, so that it is accepted
    once; only after everything above succeeded, so that junk cannot burn nonces.

Nothing here reads files, the network, the environment or the clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from attest_service.clouds import AUTO, CLOUDS, CloudProfile
from attest_service.errors import (
    CertificateExpired,
    DocumentExpired,
    DocumentNotYetValid,
    MalformedDocument,
    NonceMismatch,
    UnsupportedDocument,
)
from attest_service.verify.chain import ValidatedChain, validate_chain
from attest_service.verify.claims import Claims, parse_claims, thaw
from attest_service.verify.document import Base64Cache, decode
from attest_service.verify.instant import aware_instant
from attest_service.verify.names import cloud_for_signer, matching_name, signer_names
from attest_service.verify.pkcs7 import (
    OID_DATA,
    SignedData,
    SignedDataCache,
    parse_signed_data,
    parse_signed_data_cached,
)
from attest_service.verify.revocation import (
    DEFAULT_REVOCATION,
    REVOCATION_MODES,
    PathLink,
    RevocationMode,
    check_revocation,
    path_links,
)
from attest_service.verify.signature import SignerKey, signer_key, verify_signature
from attest_service.verify.trust import TrustStore, fingerprint

#: Default tolerance between the verifier's clock and IMDS's, applied to createdOn and expiresOn.
DEFAULT_CLOCK_SKEW: Final = timedelta(seconds=60)
#: Largest clock skew a policy may allow; beyond it the validity window would mean little.
MAX_CLOCK_SKEW: Final = timedelta(hours=1)
#: Longest nonce IMDS accepts (IMDS documentation: "nonce ... up to 32 characters").
MAX_NONCE_LENGTH: Final = 32
#: Signer certificates (and their validated chains) remembered per DocumentVerifier. Azure signs with a
#: handful of leaves at a time; the bound keeps hostile input from growing the cache.
CACHE_ENTRIES: Final = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class VerificationPolicy:
    """What a verification demands beyond authenticity: the cloud, the nonce, the clock tolerance."""

    cloud: str = AUTO
    expected_nonce: str | None = None
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW
    #: Revocation (step 6): ``soft`` (listed: refused; no current CRL: accepted and reported), ``hard`` or ``off``.
    revocation: RevocationMode = DEFAULT_REVOCATION

    def __post_init__(self) -> None:
        # A wrong field is the caller's programming error (settings and requests are validated before they
        # get here): TypeError and ValueError, as Python's own functions raise for a wrong argument.
        if not isinstance(self.cloud, str):
            raise TypeError(f"cloud must be a string, not {type(self.cloud).__name__}")
        if self.cloud != AUTO and self.cloud not in CLOUDS:
            raise ValueError(f"unknown cloud {self.cloud[:40]!r}: expected {', '.join((*CLOUDS, AUTO))}")
        if self.expected_nonce is not None and not isinstance(self.expected_nonce, str):
            raise TypeError(f"nonce must be a string or None, not {type(self.expected_nonce).__name__}")
        if self.revocation not in REVOCATION_MODES:
            raise ValueError(f"unknown revocation mode {str(self.revocation)[:40]!r}: expected "
                             f"{', '.join(REVOCATION_MODES)}")
        if not timedelta(0) <= self.clock_skew <= MAX_CLOCK_SKEW:
            raise ValueError(f"clock skew must be between 0 and {MAX_CLOCK_SKEW}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Signer:
    """The certificate that signed the document and the path that made it trusted."""

    subject: str
    issuer: str
    serial: str
    sha256: str
    not_before: datetime
    not_after: datetime
    dns_names: tuple[str, ...]
    chain: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form used by the REST API and the CLI."""
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "serialNumber": self.serial,
            "sha256": self.sha256,
            "notBefore": self.not_before.isoformat(),
            "notAfter": self.not_after.isoformat(),
            "dnsNames": list(self.dns_names),
            "chain": list(self.chain),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedDocument:
    """A document that passed every step: its cloud, its claims exactly as signed, its signer."""

    cloud: str
    claims: Claims
    signer: Signer
    digest: str
    #: Certificates on the path whose revocation no current CRL could tell (accepted in ``soft`` mode).
    revocation_unknown: int = 0

    def to_dict(self) -> dict[str, object]:
        """The contract's success body: ``{"verified": true, "cloud", "claims", "signer"}``."""
        return {"verified": True, "cloud": self.cloud, "claims": thaw(self.claims.fields),
                "signer": self.signer.to_dict()}


@dataclass(frozen=True, slots=True)
class _Candidate:
    certificate: x509.Certificate
    issuer_der: bytes
    serial: int
    subject_key_identifier: bytes | None


def _load_candidate(der: bytes) -> _Candidate:
    try:
        certificate = x509.load_der_x509_certificate(der)
        issuer_der = certificate.issuer.public_bytes()
        # cryptography decodes the subject lazily; decode it here so that a malformed one is refused
        # now, not as a foreign ValueError from the name check.
        certificate.subject.public_bytes()
        serial = certificate.serial_number
    except (ValueError, TypeError, x509.InvalidVersion, UserWarning) as exc:
        # The warning is listed because, where warnings are errors, cryptography raises it for
        # RFC 5280 violations it otherwise tolerates (such as a negative serial number). TypeError is
        # what its Name decoder raises for an attribute value of a type the attribute cannot have.
        raise MalformedDocument("a certificate in the document is not a valid X.509 certificate") from exc
    if serial <= 0:
        raise MalformedDocument("certificate in the document has a non-positive serial number (RFC 5280 4.1.2.2)")
    try:
        ski: bytes | None = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        ski = None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        # The extension errors are not ValueErrors; cryptography raises them on first access to the
        # extensions of a certificate that repeats one (RFC 5280 4.2 forbids it) or uses an odd name form.
        raise MalformedDocument("a certificate in the document has extensions that cannot be read") from exc
    return _Candidate(certificate, issuer_der, serial, ski)


def resolve_signer(signed: SignedData,
                   load: Callable[[bytes], _Candidate] = _load_candidate) -> tuple[bytes, x509.Certificate]:
    """Step 3: the one certificate the SignerInfo's ``sid`` names (RFC 5652 5.3), and its DER.

    Raises MalformedDocument when the document does not carry it, or carries two that match.
    """
    sid = signed.signer
    matches: dict[bytes, x509.Certificate] = {}
    for der in signed.certificates:
        candidate = load(der)
        if sid.issuer_der is not None:
            named = candidate.issuer_der == sid.issuer_der and candidate.serial == sid.serial
        else:
            named = candidate.subject_key_identifier == sid.subject_key_identifier
        if named:
            matches[der] = candidate.certificate
    if not matches:
        raise MalformedDocument("the document does not carry the certificate its SignerInfo names")
    if len(matches) > 1:
        raise MalformedDocument("more than one certificate matches the SignerInfo's signer identifier")
    return next(iter(matches.items()))


def signer_certificate(der: bytes) -> x509.Certificate:
    """The certificate the SignerInfo of DER document ``der`` names, without verifying anything else.

    For diagnostics after the core refused a document (``certs explain``, the AIA fallback).
    """
    return resolve_signer(parse_signed_data(der))[1]


def carried_certificates(der: bytes) -> tuple[x509.Certificate, ...]:
    """Every certificate DER document ``der`` carries (the signer's among them), parsed, nothing verified.

    For diagnostics after the core refused a document: the core never trusts a carried certificate, but one
    that chains to a pinned root and issued the signer proves which CA the signer names. Raises
    MalformedDocument when the document or a certificate in it cannot be parsed.
    """
    return tuple(_load_candidate(item).certificate for item in parse_signed_data(der).certificates)


#: Exceptions of the libraries the core calls that mean "this input cannot be processed".
_FOREIGN_ERRORS: Final = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError,
                          x509.InvalidVersion, UnsupportedAlgorithm,
                          # Where warnings are errors, cryptography's parse warnings arrive as exceptions.
                          UserWarning)


class DocumentVerifier:
    """Verifies attested documents against one :class:`TrustStore`.

    Holds no mutable state but bounded caches: of parsed signer certificates and their checked keys; of
    what documents of one signer share, parsed (:class:`~attest_service.verify.pkcs7.SignedDataCache`)
    and base64-decoded (:class:`~attest_service.verify.document.Base64Cache`), each giving exactly what
    the general code gives; and of validated chains, each used only at instants inside the validity
    window of every certificate on that chain, so a cached answer is the answer a fresh validation would
    give. Nothing is remembered of a document's own content or signature, and no decision but those
    about the signer certificate (its key, its name, its chain). A trust reload builds a new one.
    """

    def __init__(self, trust: TrustStore) -> None:
        self.trust = trust
        self._candidates: dict[bytes, _Candidate] = {}
        self._chains: dict[tuple[bytes, str], tuple[ValidatedChain, Signer, tuple[PathLink, ...]]] = {}
        self._clouds: dict[tuple[bytes, str], CloudProfile] = {}
        self._keys: dict[bytes, SignerKey] = {}
        self._signed_data = SignedDataCache(CACHE_ENTRIES)
        self._base64 = Base64Cache(CACHE_ENTRIES, self._signed_data.shared)
        self._lock = threading.Lock()

    @property
    def cached_layouts(self) -> int:
        """Entries of the document layout cache (tails and layouts); only documents that chained to the pins add any."""
        return len(self._signed_data)

    def decode(self, response: Mapping[str, object] | str | bytes) -> bytes:
        """:func:`~attest_service.verify.decode` with this verifier's base64 cache.

        The same DER or the same error, sooner for documents of a layout this verifier parsed before.
        """
        return decode(response, self._base64)

    def _candidate(self, der: bytes) -> _Candidate:
        found = self._candidates.get(der)
        if found is None:
            found = _load_candidate(der)
            with self._lock:
                if len(self._candidates) >= CACHE_ENTRIES:
                    self._candidates.clear()
                self._candidates[der] = found
        return found

    def _key(self, der: bytes, signer: x509.Certificate) -> SignerKey:
        # The key and the checks of its kind and size depend on the certificate alone: a key that passed
        # them is remembered per signer DER (reading the RSA exponent builds Python integers each time).
        # A refusal is not remembered, and is raised afresh each time.
        found = self._keys.get(der)
        if found is None:
            found = signer_key(signer)
            with self._lock:
                if len(self._keys) >= CACHE_ENTRIES:
                    self._keys.clear()
                self._keys[der] = found
        return found

    def _cloud(self, der: bytes, signer: x509.Certificate, requested: str) -> CloudProfile:
        # The name rule depends on the certificate and the requested cloud only, so its (successful) outcome
        # is remembered per signer; a refusal is recomputed each time and raised afresh.
        key = (der, requested)
        cloud = self._clouds.get(key)
        if cloud is None:
            cloud = cloud_for_signer(signer) if requested == AUTO else CLOUDS[requested]
            matching_name(signer, cloud)
            with self._lock:
                if len(self._clouds) >= CACHE_ENTRIES:
                    self._clouds.clear()
                self._clouds[key] = cloud
        return cloud

    def _chain(self, der: bytes, signer: x509.Certificate, cloud: CloudProfile,
               now: datetime) -> tuple[Signer, tuple[PathLink, ...]]:
        key = (der, cloud.name)
        cached = self._chains.get(key)
        if cached is not None and cached[0].covers(now):
            return cached[1], cached[2]
        chain = validate_chain(signer, self.trust.for_cloud(cloud.name), now)
        described = _describe(signer, chain)
        # What the revocation lookup needs of the path is fixed with the path; the lookup itself is not cached.
        links = path_links(chain.certificates)
        with self._lock:
            if len(self._chains) >= CACHE_ENTRIES:
                self._chains.clear()
            self._chains[key] = (chain, described, links)
        return described, links

    def verify(self, der: bytes, *, policy: VerificationPolicy, at: datetime | None = None,
               now: datetime | None = None) -> VerifiedDocument:
        """Verify the DER document ``der`` (:mod:`attest_service.verify.document` decodes what callers hold) at ``at``.

        ``at`` is the timezone-aware instant, as on every public call of the package; ``now`` is its former
        name, still accepted. The core reads no clock, so one of them is required. Returns a
        :class:`VerifiedDocument`; raises a :class:`~attest_service.errors.VerificationError` subclass naming
        the first step that failed, and TypeError or ValueError for a missing, naive or non-datetime instant.
        """
        if (at is None) == (now is None):
            raise TypeError("verify() takes the instant as at= (or its former name now=), exactly once")
        now = aware_instant(at if at is not None else now)
        try:
            return self._verify(der, policy, now)
        except _FOREIGN_ERRORS as exc:
            # Every step wraps the foreign errors it knows of where they arise. cryptography decodes some
            # certificate fields lazily, and a hostile certificate has more than once raised a type nobody
            # expected from a field nobody thought could fail; the document is refused all the same, never
            # answered with a crash.
            raise MalformedDocument("the document could not be processed: a part of it is not what it claims "
                                    "to be") from exc

    def _verify(self, der: bytes, policy: VerificationPolicy, now: datetime) -> VerifiedDocument:
        # Step 2: strict DER SignedData.
        # A new layout is remembered only once the document is signed by a certificate that chains to the pins
        # (after step 6): one that need only parse, or that its sender signed with a key of its own, is not kept.
        deferred: list[Callable[[], None]] = []
        signed = parse_signed_data_cached(der, self._signed_data, deferred)
        if signed.content_type != OID_DATA:
            raise UnsupportedDocument(f"content type {signed.content_type} is not id-data")
        # Step 3: the signer is the certificate the SignerInfo names.
        signer_der, signer = resolve_signer(signed, self._candidate)
        # Step 4: the signature, under that certificate only.
        digest = verify_signature(signed, signer, key_of=lambda certificate: self._key(signer_der, certificate))
        # Step 5: the name decides (or must fit) the cloud.
        cloud = self._cloud(signer_der, signer, policy.cloud)
        # Step 6: path through pinned intermediates to the cloud's roots, at the instant.
        try:
            described, links = self._chain(signer_der, signer, cloud, now)
        except CertificateExpired as expired:
            # The document's own window first, when it too has passed (the docstring's step 6 says why).
            _check_window(signed.content, policy, now, cause=expired)
            raise
        # Step 6, revocation: every certificate on the path but the root against its issuer's current CRL.
        unknown = check_revocation(links, self.trust.for_cloud(cloud.name).crls_by_issuer, policy.revocation, now)
        for remember in deferred:
            remember()
        # Step 7: the signed content.
        claims = parse_claims(signed.content)
        # Step 8: the validity window, within the allowed skew.
        _check_claims_window(claims, policy, now)
        # Step 9: the nonce the caller expects.
        if policy.expected_nonce is not None and claims.nonce != policy.expected_nonce:
            raise NonceMismatch(f"the signed nonce {claims.nonce[:64]!r} is not the expected one",
                                signed_nonce=claims.nonce)
        return VerifiedDocument(cloud=cloud.name, claims=claims, signer=described, digest=digest,
                                revocation_unknown=unknown)


def _check_claims_window(claims: Claims, policy: VerificationPolicy, now: datetime,
                         cause: CertificateExpired | None = None) -> None:
    """Step 8: raise DocumentExpired or DocumentNotYetValid when ``now`` is outside the document's window."""
    if now > claims.expires_on + policy.clock_skew:
        raise DocumentExpired(f"the document expired at {claims.expires_on.isoformat()}") from cause
    if claims.created_on > now + policy.clock_skew:
        raise DocumentNotYetValid(f"the document is created at {claims.created_on.isoformat()}, "
                                  f"after {now.isoformat()}") from cause


def _check_window(content: bytes, policy: VerificationPolicy, now: datetime, *, cause: CertificateExpired) -> None:
    """Steps 7 and 8 for a document whose path exists only at other instants; returns when its window holds.

    Content that does not parse is left to the certificate's refusal: this only chooses between two
    expiries, and reports nothing else.
    """
    try:
        claims = parse_claims(content)
    except MalformedDocument:
        return
    _check_claims_window(claims, policy, now, cause=cause)


def _describe(signer: x509.Certificate, chain: ValidatedChain) -> Signer:
    return Signer(
        subject=signer.subject.rfc4514_string(),
        issuer=signer.issuer.rfc4514_string(),
        serial=format(signer.serial_number, "x"),
        sha256=fingerprint(signer),
        not_before=signer.not_valid_before_utc,
        not_after=signer.not_valid_after_utc,
        dns_names=signer_names(signer),
        chain=tuple(cert.subject.rfc4514_string() for cert in chain.certificates),
    )


def verify_document(der: bytes, *, trust: TrustStore, policy: VerificationPolicy,
                    now: datetime) -> VerifiedDocument:
    """One-shot form of :meth:`DocumentVerifier.verify` for callers without a long-lived DocumentVerifier."""
    return DocumentVerifier(trust).verify(der, policy=policy, now=now)


__all__: Final = [
    "DEFAULT_CLOCK_SKEW",
    "MAX_NONCE_LENGTH",
    "DocumentVerifier",
    "Signer",
    "VerificationPolicy",
    "VerifiedDocument",
    "signer_certificate",
    "verify_document",
]
