"""Why a document fails verification, and for a chain failure what the pinned trust lacks (``certs explain``).

No network: the explanation names the issuer the signer needs and where its AIA points, so an operator can
fetch, check and pin it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from attest_service.clouds import AUTO
from attest_service.errors import AttestError, step_of
from attest_service.trust.certificates import ca_issuers_urls
from attest_service.verify import (
    DocumentVerifier,
    TrustStore,
    VerificationPolicy,
    cloud_for_signer,
    decode,
    signer_certificate,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Explanation:
    """Why a document verifies or not, and for a chain failure what the trust lacks."""

    verified: bool
    step: str | None
    error: dict[str, str] | None
    cloud: str | None = None
    signer_subject: str | None = None
    signer_issuer: str | None = None
    ca_issuers: tuple[str, ...] = ()
    #: Whether the document's cloud pins a certificate named as the signer's issuer; ``issuer_pins`` lists
    #: such pins in every cloud (a pin present for another cloud is a common cause).
    issuer_pinned: bool = False
    issuer_pins: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """JSON form (``certs explain --json``)."""
        return {"verified": self.verified, "step": self.step, "error": self.error, "cloud": self.cloud,
                "signer": None if self.signer_subject is None else {
                    "subject": self.signer_subject, "issuer": self.signer_issuer,
                    "caIssuers": list(self.ca_issuers)},
                "issuerPinned": self.issuer_pinned, "issuerPins": list(self.issuer_pins)}


def explain_document(data: bytes, trust: TrustStore, *, cloud: str = AUTO, now: datetime) -> Explanation:
    """Run the verification core on ``data`` (as ``verify`` reads it) and explain the outcome; no network."""
    try:
        document = decode(data)
    except AttestError as exc:
        return Explanation(verified=False, step=step_of(exc), error=exc.to_dict())
    try:
        DocumentVerifier(trust).verify(document, policy=VerificationPolicy(cloud=cloud), now=now)
    except AttestError as exc:
        step = step_of(exc)
        if exc.code not in ("untrusted_chain", "certificate_expired"):
            return Explanation(verified=False, step=step, error=exc.to_dict())
        signer = signer_certificate(document)
        # The chain step runs after the name step, so the signer's name does select a cloud here.
        target = cloud_for_signer(signer).name if cloud == AUTO else cloud
        pins = [pin for pin in trust.all_pins() if pin.certificate.subject == signer.issuer]
        return Explanation(verified=False, step=step, error=exc.to_dict(), cloud=target,
                           signer_subject=signer.subject.rfc4514_string(),
                           signer_issuer=signer.issuer.rfc4514_string(),
                           ca_issuers=ca_issuers_urls(signer),
                           issuer_pinned=any(pin.cloud == target for pin in pins),
                           issuer_pins=tuple(f"{pin.cloud}: {pin.source}" for pin in pins))
    return Explanation(verified=True, step=None, error=None)


