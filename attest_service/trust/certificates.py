"""x509 helpers the trust operations and the AIA fallback share: CA tests, CA path validation, AIA URLs.

Path validation is the verification core's (``verify/chain.py`` policies and cryptography's RFC 5280 path
builder); nothing here builds chains by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509 import verification
from cryptography.x509.oid import AuthorityInformationAccessOID

from attest_service.errors import CertificateExpired, UntrustedChain
from attest_service.verify import CA_POLICY, MAX_INTERMEDIATES, CloudTrust, common_name

_ONE_SECOND: Final = timedelta(seconds=1)


def is_ca(certificate: x509.Certificate) -> bool:
    """True when basicConstraints is present and marks the certificate as a CA (RFC 5280 4.2.1.9)."""
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return constraints.ca


def is_self_signed(certificate: x509.Certificate) -> bool:
    """True when the certificate names itself as issuer and its signature verifies under its own key."""
    if certificate.subject != certificate.issuer:
        return False
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def ca_path(
    certificate: x509.Certificate,
    trust: CloudTrust,
    instant: datetime,
    *,
    extra: Sequence[x509.Certificate] = (),
) -> tuple[x509.Certificate, ...]:
    """Validate that CA ``certificate`` chains to a root of ``trust`` at ``instant``; return the path.

    The path may run through the cloud's pinned intermediates and ``extra`` (other certificates being
    pinned together). The CA extension policy of the verification core is applied to every certificate,
    including the one being checked. Raises UntrustedChain when there is no path, CertificateExpired
    when a certificate on every path is outside its validity at ``instant``.
    """
    if trust.store is None:
        raise UntrustedChain(f"cloud {trust.profile.name} has no pinned roots")
    if not is_ca(certificate):
        raise UntrustedChain(f"{common_name(certificate.subject)} is not a CA (basicConstraints)")
    if not certificate.not_valid_before_utc <= instant <= certificate.not_valid_after_utc:
        raise CertificateExpired(
            f"{common_name(certificate.subject)} is valid {certificate.not_valid_before_utc.isoformat()} to "
            f"{certificate.not_valid_after_utc.isoformat()}, not at {instant.isoformat()}")
    verifier = (
        verification.PolicyBuilder()
        .store(trust.store)
        .time(instant)
        .max_chain_depth(MAX_INTERMEDIATES)
        .extension_policies(ca_policy=CA_POLICY, ee_policy=CA_POLICY)
        .build_client_verifier()
    )
    candidates = [*trust.intermediate_certificates, *extra]
    try:
        chain = verifier.verify(certificate, [c for c in candidates if c != certificate]).chain
    except verification.VerificationError as exc:
        raise UntrustedChain(f"{common_name(certificate.subject)} does not chain to a {trust.profile.name} root "
                             f"at {instant.isoformat()}") from exc
    return tuple(chain)


def anchor_instant(certificate: x509.Certificate, now: datetime) -> datetime:
    """``now``, or the last second of the certificate's validity when it has expired (for retired pins)."""
    return min(now, certificate.not_valid_after_utc - _ONE_SECOND)


def ca_issuers_urls(certificate: x509.Certificate) -> tuple[str, ...]:
    """The caIssuers URIs of the Authority Information Access extension (RFC 5280 4.2.2.1), in order."""
    try:
        aia = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return ()
    return tuple(
        str(description.access_location.value)
        for description in aia
        if description.access_method == AuthorityInformationAccessOID.CA_ISSUERS
        and isinstance(description.access_location, x509.UniformResourceIdentifier)
    )
