"""Throughput of the verification core against the bare RSA verification it cannot avoid.

One real-shaped document (a real Azure document from ``$ATTEST_AZURE_REAL_DIR`` or ``../shared/azure-real``,
verified at its own instant with the bundled pins; without it, the generated RSA-2048 test document with
the test pins) is verified over and over by one long-lived Verifier, as the service does for a repeat
signer (the chain is validated once and cached). In the same process, the same RSA-2048 PKCS#1 v1.5
signature is verified bare. Prints documents/s, bare verifications/s and their ratio (targets: at least
10,000 documents/s and a ratio of at least 0.25), then with ``--profile`` where a verification spends its
time. The process is pinned to one CPU where the platform allows. Then the costly refusals: documents signed
under keys outside what Azure uses (refused before the RSA operation) next to the RSA operation the key would
have cost, and failing chains with the number of path-building runs each made. Prints figures; asserts
nothing.

Run: ``python benchmarks/bench_verify.py [--seconds S] [--profile]``
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from attest_service.errors import VerificationError  # noqa: E402
from attest_service.trust import TrustStore, bundled_pinned_dir, load_trust  # noqa: E402
from attest_service.verify import (  # noqa: E402
    CloudTrust,
    VerificationPolicy,
    Verifier,
    chain,
    decode_document,
    signer_certificate,
)
from attest_service.verify.pkcs7 import parse_signed_data  # noqa: E402

TARGET_DOCUMENTS_PER_SECOND = 10_000
TARGET_RATIO = 0.25
REAL_DOCUMENT = "tc-2026-04-23-microsoft-azure-rsa-tls-issuing-ca-04.json"
TESTCASES = REPO_ROOT / "tests" / "assets" / "testcases"
#: Generated cases signed under keys the core refuses, timed against the RSA operation they would have cost.
COSTLY_KEY_CASES = ("key-rsa-huge-exponent", "key-rsa-8192", "key-rsa-e3")
#: Generated cases whose chain fails, with the path-building runs each makes.
FAILING_CHAIN_CASES = ("intermediate-not-pinned", "attack-lookalike-chain", "leaf-expired")


def pick_document() -> tuple[str, bytes, TrustStore, datetime]:
    """The document to time: a real one when available, else the generated base document."""
    real = Path(os.environ.get("ATTEST_AZURE_REAL_DIR", REPO_ROOT.parent / "shared" / "azure-real")) / "documents"
    expected = real / "expected.json"
    if expected.is_file():
        entries = {entry["document"]: entry for entry in json.loads(expected.read_text(encoding="utf-8"))}
        entry = entries.get(REAL_DOCUMENT) or next(iter(entries.values()))
        now = datetime.fromisoformat(entry["verify_at"].replace("Z", "+00:00"))
        return (f"real Azure document {entry['document']}", (real / entry["document"]).read_bytes(),
                load_trust(bundled_pinned_dir()), now)
    case = json.loads((TESTCASES / "index.json").read_text(encoding="utf-8"))["cases"]["ok-rsa"]
    return ("generated RSA-2048 document (real documents not found)", (TESTCASES / case["file"]).read_bytes(),
            load_trust(TESTCASES / "pinned"), datetime.fromisoformat(case["at"]))


def rate(operation: Callable[[], object], seconds: float) -> float:
    """Operations per second over about ``seconds`` of wall time (after a short warm-up)."""
    for _ in range(200):
        operation()
    count = 0
    batch = 500
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            operation()
        count += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or time.perf_counter() >= deadline:
            return count / elapsed


def refusal_rate(verifier: Verifier, der: bytes, now: datetime, seconds: float) -> float:
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
    verifier = Verifier(load_trust(TESTCASES / "pinned"))
    for name in COSTLY_KEY_CASES:
        der = decode_document((TESTCASES / cases[name]["file"]).read_bytes())
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
        der = decode_document((TESTCASES / cases[name]["file"]).read_bytes())
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
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure (default 3)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile breakdown of verifications")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    label, raw, trust, now = pick_document()
    verifier = Verifier(trust)
    policy = VerificationPolicy()
    # The service receives the response JSON; the timed operation starts from it, as a request does.
    text = raw.decode("utf-8")
    verifier.verify(decode_document(text), policy=policy, now=now)

    def verify_document() -> object:
        return verifier.verify(decode_document(text), policy=policy, now=now)

    signed = parse_signed_data(decode_document(text))
    # Azure's documents (and the generated base one) carry the signer certificate only.
    signer_key = x509.load_der_x509_certificate(signed.certificates[0]).public_key()
    if not isinstance(signer_key, rsa.RSAPublicKey):
        print(f"{label}: the signer key is not RSA; the bare comparison needs an RSA document")
        return 1

    def verify_bare() -> None:
        signer_key.verify(signed.signature, signed.content, padding.PKCS1v15(), hashes.SHA256())

    documents = rate(verify_document, args.seconds)
    bare = rate(verify_bare, args.seconds)
    ratio = documents / bare
    print(f"document:                 {label}, {signer_key.key_size}-bit RSA, {len(raw)} bytes of JSON")
    print(f"documents verified/s:     {documents:10,.0f}   (target >= {TARGET_DOCUMENTS_PER_SECOND:,})")
    print(f"bare RSA verifications/s: {bare:10,.0f}")
    print(f"ratio:                    {ratio:10.2f}   (target >= {TARGET_RATIO})")
    print(f"per document:             {1e6 / documents:10.1f} us, of which bare RSA {1e6 / bare:.1f} us")
    costly_refusals(args.seconds)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20_000):
            verify_document()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
