"""Step 5: the signer's name must be the cloud's metadata domain or a subdomain of it.

Rule (IMDS documentation, "Attested data": the certificate is for ``metadata.azure.com`` or the
sovereign clouds' equivalents): the DNS names of the subjectAltName extension are authoritative; the
subject CN is consulted only when the certificate has no SAN at all (RFC 6125 6.4.4).
"""

from __future__ import annotations

import re
from typing import Final

from cryptography import x509

from attest_service.clouds import CLOUDS, CloudProfile
from attest_service.errors import MalformedDocument, SubjectMismatch

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def signer_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """The names the rule considers: SAN DNS names, or the CN when there is no SAN extension."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        values = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return tuple(str(attr.value) for attr in values)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:  # undecodable extensions
        raise MalformedDocument("the signer certificate's extensions cannot be read") from exc
    return tuple(san.value.get_values_for_type(x509.DNSName))


def _is_ascii_hostname(name: str) -> bool:
    # Only plain letter-digit-hyphen labels (RFC 1123): internationalised look-alikes ("metadata.azure.com"
    # with a Cyrillic letter a) are refused rather than case-folded, and so are wildcards ("*.metadata..."),
    # which Azure's signers never carry and which would stand for hosts other than IMDS.
    return _HOSTNAME.fullmatch(name) is not None


def matching_name(certificate: x509.Certificate, cloud: CloudProfile) -> str:
    """Return the first name of ``certificate`` that ``cloud`` covers; raise SubjectMismatch otherwise."""
    names = signer_names(certificate)
    for name in names:
        if _is_ascii_hostname(name) and cloud.covers(name):
            return name
    shown = ", ".join(names) or "none"
    raise SubjectMismatch(f"signer names ({shown}) are not {cloud.domain} or a subdomain of it")


def cloud_for_signer(certificate: x509.Certificate) -> CloudProfile:
    """For ``--cloud auto``: the cloud whose domain covers the signer's name; SubjectMismatch if none."""
    names = signer_names(certificate)
    for name in names:
        if not _is_ascii_hostname(name):
            continue
        for profile in CLOUDS.values():
            if profile.covers(name):
                return profile
    shown = ", ".join(names) or "none"
    raise SubjectMismatch(f"signer names ({shown}) belong to no Azure cloud's metadata domain")
