"""What refusing a costly document takes: keys outside what Azure uses, and failing chains.

Documents signed under keys the core refuses before any RSA operation (a 3000-bit exponent, an 8192-bit
modulus, e=3) are timed next to the RSA operation each would have cost; documents whose chain fails are timed
with the number of path-building runs each made (the core bounds them). Uses the generated test cases and
their pins. Prints figures; asserts nothing.

Run: ``python benchmarks/bench_refusals.py [--seconds S]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(BENCH_DIR))

from bench_verify import rate  # noqa: E402

from attest_service.errors import VerificationError  # noqa: E402
from attest_service.trust import load_trust  # noqa: E402
from attest_service.verify import (  # noqa: E402
    CloudTrust,
    DocumentVerifier,
    VerificationPolicy,
    chain,
    decode,
    signer_certificate,
)
from attest_service.verify.pkcs7 import parse_signed_data  # noqa: E402

TESTCASES = REPO_ROOT / "tests" / "assets" / "testcases"

#: Generated cases signed under keys the core refuses, timed against the RSA operation they would have cost.
COSTLY_KEY_CASES = ("key-rsa-huge-exponent", "key-rsa-8192", "key-rsa-e3")
#: Generated cases whose chain fails, with the path-building runs each makes.
FAILING_CHAIN_CASES = ("intermediate-not-pinned", "attack-lookalike-chain", "leaf-expired")


def refusal_rate(verifier: DocumentVerifier, der: bytes, now: datetime, seconds: float) -> float:
    """Refusals per second of ``der`` (which must be refused)."""
    policy = VerificationPolicy()

    def refuse() -> None:
        try:
            verifier.verify(der, policy=policy, now=now)
        except VerificationError:
            return
        raise SystemExit("a costly case verified; the benchmark expects a refusal")

    return rate(refuse, seconds)


def costly_refusals(seconds: float) -> None:
    """Print what refusing each costly generated case takes, and what it would have taken."""
    cases = json.loads((TESTCASES / "index.json").read_text(encoding="utf-8"))["cases"]
    verifier = DocumentVerifier(load_trust(TESTCASES / "pinned"))
    for name in COSTLY_KEY_CASES:
        der = decode((TESTCASES / cases[name]["file"]).read_bytes())
        now = datetime.fromisoformat(cases[name]["at"])
        signed = parse_signed_data(der)
        key = signer_certificate(der).public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        refused = refusal_rate(verifier, der, now, seconds)

        def bare(key: rsa.RSAPublicKey = key, signature: bytes = signed.signature,
                 content: bytes = signed.content) -> None:
            key.verify(signature, content, padding.PKCS1v15(), hashes.SHA256())

        costly = rate(bare, seconds / 4)
        print(f"{name + ':':40} refused in {1e6 / refused:8.1f} us; its RSA operation alone {1e6 / costly:8.1f} us "
              f"({key.key_size} bits, {key.public_numbers().e.bit_length()}-bit exponent)")
    runs: list[datetime] = []
    real = chain._attempt  # counted around, not replaced

    def counted(signer: x509.Certificate, trust: CloudTrust, instant: datetime) -> list[x509.Certificate]:
        runs.append(instant)
        return real(signer, trust, instant)

    for name in FAILING_CHAIN_CASES:
        der = decode((TESTCASES / cases[name]["file"]).read_bytes())
        now = datetime.fromisoformat(cases[name]["at"])
        chain._attempt = counted
        try:
            with contextlib.suppress(VerificationError):
                verifier.verify(der, policy=VerificationPolicy(), now=now)
        finally:
            chain._attempt = real
        refused = refusal_rate(verifier, der, now, seconds)
        print(f"{name + ':':40} refused in {1e6 / refused:8.1f} us after {len(runs)} path-building run(s) "
              f"({cases[name]['expect']})")
        runs.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="measuring time per figure (default 1)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    costly_refusals(args.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
