"""Step 6: a path from the signer through pinned intermediates to a root of the cloud (RFC 5280 6).

Path building and validation are cryptography's ``x509.verification`` (the Rust implementation of
RFC 5280 with the CA/B Forum profile). Three deliberate choices:

- Only pinned intermediates are offered to the path builder; certificates carried in the document are
  never candidates, so a forger cannot supply their own issuing CA.
- Extended key usage is not required to contain clientAuth. The signer is a TLS *server* certificate
  (2026 leaves carry serverAuth only) and the Microsoft TLS G2 intermediates restrict their EKU to
  serverAuth; the client verifier's default EKU checks would refuse genuine documents. The leaf must
  still carry serverAuth when it has an EKU at all (see ``_leaf_eku``).
- The signer need not carry a subjectAltName: the name rule falls back to the CN when there is none,
  and the name is checked in names.py, not by the path builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from attest_service.errors import CertificateExpired, UntrustedChain
from attest_service.verify.trust import CloudTrust

#: Longest path accepted: leaf, up to three intermediates, root. The 2026 G2 chains use two
#: (issuing CA, then the cross-signed Microsoft TLS RSA Root G2).
MAX_INTERMEDIATES: Final = 3

#: Extra path-building runs a failing chain may make to tell an expired path from no path at all. Each run
#: costs about what a whole verification of a cached signer does, and a forger chooses when a chain fails:
#: the runs are bounded by this constant whatever the document holds.
MAX_TIME_PROBES: Final = 3

_SECOND: Final = timedelta(seconds=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidatedChain:
    """A validated path, and the window of instants in which every certificate on it is valid."""

    certificates: tuple[x509.Certificate, ...]
    valid_from: datetime
    valid_until: datetime

    def covers(self, instant: datetime) -> bool:
        """True when the same path is valid at ``instant`` (so a cached result may be reused)."""
        return self.valid_from <= instant <= self.valid_until


def _leaf_eku(_policy: verification.Policy, _cert: x509.Certificate,
              eku: x509.ExtendedKeyUsage | None) -> None:
    # An EKU that excludes TLS server use means the key was issued for something else (code signing,
    # e-mail); refuse it even though the name matches.
    if eku is not None and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise ValueError("signer certificate's extended key usage does not include serverAuth")


#: Extension policy for CA certificates on a path: the web PKI defaults, EKU not required (see above).
CA_POLICY: Final = verification.ExtensionPolicy.webpki_defaults_ca().may_be_present(
    x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, None)
# The Web PKI profile requires a SAN on every end entity; the name rule here (names.py, the contract's
# "the CN only when there is no SAN") accepts a CN-only signer, so the SAN is optional for the path and
# the name is judged by names.py alone.
#: Extension policy for the signer: the web PKI defaults; an EKU, when present, must allow serverAuth.
EE_POLICY: Final = (
    verification.ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, _leaf_eku)
    .may_be_present(x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
)


def _attempt(signer: x509.Certificate, trust: CloudTrust, instant: datetime) -> list[x509.Certificate]:
    assert trust.store is not None  # noqa: S101 - checked by the caller; narrows the type
    verifier = (
        verification.PolicyBuilder()
        .store(trust.store)
        .time(instant)
        .max_chain_depth(MAX_INTERMEDIATES)
        .extension_policies(ca_policy=CA_POLICY, ee_policy=EE_POLICY)
        .build_client_verifier()
    )
    return verifier.verify(signer, list(trust.intermediate_certificates)).chain


def _issuer_is_pinned(signer: x509.Certificate, trust: CloudTrust) -> bool:
    """Whether some pin of the cloud carries the name the signer gives as its issuer.

    Without one no path can exist at any instant, so probing other instants would be wasted work.
    """
    return any(pin.certificate.subject == signer.issuer for pin in (*trust.intermediates, *trust.roots))


def probe_instants(signer: x509.Certificate, instant: datetime) -> tuple[datetime, ...]:
    """The instants, inside the signer's own validity, at which a failing path is tried again.

    At most :data:`MAX_TIME_PROBES`, without repeats and without ``instant`` itself (which just failed).
    """
    start, end = signer.not_valid_before_utc, signer.not_valid_after_utc
    candidates = (start + (end - start) / 2, start + _SECOND, end - _SECOND)
    probes = [probe for probe in dict.fromkeys(candidates) if probe != instant and start <= probe <= end]
    return tuple(probes[:MAX_TIME_PROBES])


def validate_chain(signer: x509.Certificate, trust: CloudTrust, instant: datetime) -> ValidatedChain:
    """Build and validate the path at ``instant``.

    Raises UntrustedChain when no path exists at all, CertificateExpired when a path exists but some
    certificate on it is outside its validity at ``instant``. Path building runs once when a path exists,
    and at most ``1 + MAX_TIME_PROBES`` times when it does not.
    """
    if trust.store is None:
        raise UntrustedChain(f"cloud {trust.profile.name} has no pinned roots")
    try:
        chain = _attempt(signer, trust, instant)
    except verification.VerificationError as exc:
        # Distinguish "expired" from "untrusted": retry at instants inside the signer's own validity.
        # If a path exists then, the failure now is one of time. Only failed verifications pay this, and
        # not at all when no pin even carries the issuer's name.
        start, end = signer.not_valid_before_utc, signer.not_valid_after_utc
        probes = probe_instants(signer, instant) if _issuer_is_pinned(signer, trust) else ()
        for probe in probes:
            try:
                _attempt(signer, trust, probe)
            except verification.VerificationError:
                continue
            raise CertificateExpired(
                f"a path to a pinned root exists, but not at {instant.isoformat()}: "
                f"the signer is valid {start.isoformat()} to {end.isoformat()}") from exc
        # The library's own account of the failure stays on the exception (its __cause__), for the log.
        raise UntrustedChain(f"no path from the signer through pinned intermediates to a {trust.profile.name} "
                             "root") from exc
    valid_from = max(cert.not_valid_before_utc for cert in chain)
    valid_until = min(cert.not_valid_after_utc for cert in chain)
    return ValidatedChain(certificates=tuple(chain), valid_from=valid_from, valid_until=valid_until)
