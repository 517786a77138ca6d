"""The library's verifier: the verification core with the pinned trust loaded, for in-process use.

``from attest_service import Verifier`` gives this class. It is the core's
:class:`~attest_service.verify.DocumentVerifier` (same algorithm, same caches, safe to share between
threads) with the two ways of getting trust a Python license server needs, and one call that takes the IMDS response in
whatever form the caller holds it::

    verifier = Verifier.bundled()
    result = verifier.verify_response(response, cloud="auto", nonce=None, at=None)

Every refusal raises :class:`~attest_service.errors.VerificationError` (its ``code`` is one of the
contract's). A wrong argument is the caller's programming error and raises what Python raises for one: a
:class:`TypeError` (``at`` not a datetime, ``cloud`` or ``nonce`` not a string) or a :class:`ValueError` (a
naive ``at``, an unknown cloud). An unusable pinned directory raises
:class:`~attest_service.errors.ConfigurationError`; it and VerificationError are
:class:`~attest_service.errors.AttestError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from attest_service.clouds import AUTO, CLOUDS
from attest_service.trust.loading import bundled_pinned_dir, load_trust
from attest_service.verify import (
    DEFAULT_CLOCK_SKEW,
    DEFAULT_REVOCATION,
    REVOCATION_MODES,
    DocumentVerifier,
    RevocationMode,
    VerificationPolicy,
    VerifiedDocument,
    aware_instant,
)

#: The policy of a call without a nonce, per cloud and revocation mode: a policy is immutable, and building one
#: checks its arguments again each time. Any other call builds its own (and an unknown cloud is refused there).
_POLICIES: Final = {(name, mode): VerificationPolicy(cloud=name, clock_skew=DEFAULT_CLOCK_SKEW, revocation=mode)
                    for name in (AUTO, *CLOUDS) for mode in REVOCATION_MODES}


class Verifier(DocumentVerifier):
    """Verifies IMDS attested documents against pinned trust; build it with :meth:`bundled` or :meth:`from_directory`.

    ``Verifier(trust_store)`` also works, with a :class:`~attest_service.verify.TrustStore` built by hand.
    """

    @classmethod
    def bundled(cls) -> Verifier:
        """A verifier over the pins shipped inside the package (``attest_service/pinned_certs``)."""
        return cls(load_trust(bundled_pinned_dir()))

    @classmethod
    def from_directory(cls, path: str | os.PathLike[str]) -> Verifier:
        """A verifier over an operator's pinned directory (``<cloud>/roots``, ``<cloud>/intermediates``).

        Raises ConfigurationError when the directory is missing or holds an unusable file.
        """
        return cls(load_trust(Path(path)))

    def verify_response(self, response: Mapping[str, object] | str | bytes, *, cloud: str = AUTO,
                        nonce: str | None = None, at: datetime | None = None,
                        revocation: RevocationMode = DEFAULT_REVOCATION) -> VerifiedDocument:
        """Verify one IMDS response: a ``dict``, JSON text or bytes, or the bare base64 signature.

        ``cloud`` is ``public``, ``usgov``, ``china``, ``germany`` or ``auto`` (the cloud whose domain the
        signer's name falls under); ``nonce`` the expected nonce (None: reported, not checked); ``at`` a
        timezone-aware instant (default: now; a naive one is a ValueError, a string a TypeError); ``revocation``
        what the directory's CRLs decide (``soft``: a certificate a current CRL lists is refused
        ``certificate_revoked``, one no current CRL covers is accepted and counted in
        ``result.revocation_unknown``; ``hard``: that one is refused ``revocation_unknown``; ``off``: CRLs are
        not looked at). Returns the frozen result: ``.cloud``, ``.claims`` (a read-only mapping equal to the
        signed JSON) and ``.signer``. This checks authenticity only: to accept each nonce once, use
        :class:`~attest_service.attestation.Attestor`.
        """
        instant = datetime.now(UTC) if at is None else aware_instant(at)
        policy = (_POLICIES.get((cloud, revocation)) if nonce is None and isinstance(cloud, str)
                  and isinstance(revocation, str) else None)
        if policy is None:
            # Refuses a cloud, nonce or mode of the wrong type (TypeError) or an unknown one (ValueError).
            policy = VerificationPolicy(cloud=cloud, expected_nonce=nonce, clock_skew=DEFAULT_CLOCK_SKEW,
                                        revocation=revocation)
        der = self.decode(response)
        return self.verify(der, policy=policy, at=instant)


__all__ = ["Verifier"]
