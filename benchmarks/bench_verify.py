"""Throughput of the verification core against the bare RSA verification it cannot avoid, on one core.

One real-shaped document (a real Azure document from ``$ATTEST_AZURE_REAL_DIR`` or ``../shared/azure-real``,
verified at its own instant with the bundled pins; without it, the generated RSA-2048 test document with
the test pins) is verified over and over by one long-lived verifier, as the service does for a repeat
signer (the chain is validated once and cached), starting from the response JSON as a caller holds it.
The entry point is the public library API, ``attest_service.Verifier.verify_response``, when the package
has it, and otherwise the internal path the service uses (``decode`` then
``attest_service.verify.DocumentVerifier.verify``); the output says which. In the same process, the same RSA-2048
PKCS#1 v1.5 signature is verified bare. The two are measured in alternating rounds and the best round of
each is kept, so that a burst of other work on the machine affects both alike. Prints documents/s, bare
verifications/s and their ratio beside its target (at least 0.3, aim 0.4), then with ``--profile`` where a
verification spends its time. The verifier remembers what documents of one signer share (the parsed
certificate and SignerInfo, the layout, the base64 of the certificate), never anything of one document's
own; ``--distinct N`` also times N different documents (fresh nonces of one length, VM ids and
timestamps) signed by one generated RSA-2048 signer, each verified in turn, beside that signer's bare RSA.
With ``--iterations N`` it only verifies N times (for ``valgrind --tool=callgrind``, whose instruction
counts do not depend on other load). The process is pinned to one
CPU where the platform allows. Prints figures; asserts nothing.

Run: ``python benchmarks/bench_verify.py [--seconds S] [--rounds N] [--profile] [--distinct N] [--iterations N]``
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import io
import itertools
import json
import os
import pstats
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(BENCH_DIR))

import targets  # noqa: E402

import attest_service  # noqa: E402
from attest_service.imds import pki  # noqa: E402
from attest_service.trust import bundled_pinned_dir, load_trust  # noqa: E402
from attest_service.verify import DocumentVerifier, VerificationPolicy, decode  # noqa: E402
from attest_service.verify.pkcs7 import parse_signed_data  # noqa: E402

REAL_DOCUMENT = "tc-2026-04-23-microsoft-azure-rsa-tls-issuing-ca-04.json"


def pick_document() -> tuple[str, bytes, Path | None, datetime]:
    """The document to time: a real one when available, else the generated base document.

    Returns a label, the response JSON, the pinned directory (None: the bundled pins) and the instant.
    """
    real = Path(os.environ.get("ATTEST_AZURE_REAL_DIR", REPO_ROOT.parent / "shared" / "azure-real")) / "documents"
    expected = real / "expected.json"
    if expected.is_file():
        entries = {entry["document"]: entry for entry in json.loads(expected.read_text(encoding="utf-8"))}
        entry = entries.get(REAL_DOCUMENT) or next(iter(entries.values()))
        now = datetime.fromisoformat(entry["verify_at"].replace("Z", "+00:00"))
        return f"real Azure document {entry['document']}", (real / entry["document"]).read_bytes(), None, now
    testcases = REPO_ROOT / "tests" / "assets" / "testcases"
    case = json.loads((testcases / "index.json").read_text(encoding="utf-8"))["cases"]["ok-rsa"]
    return ("generated RSA-2048 document (real documents not found)", (testcases / case["file"]).read_bytes(),
            testcases / "pinned", datetime.fromisoformat(case["at"]))


def document_operation(text: str, pinned: Path | None, now: datetime) -> tuple[str, Callable[[], object]]:
    """The timed verification, through the public API when the package has it; and its description."""
    public = getattr(attest_service, "Verifier", None)
    if public is not None and callable(getattr(public, "verify_response", None)):
        verifier = public.bundled() if pinned is None else public.from_directory(pinned)
        verifier.verify_response(text, at=now)
        return ("attest_service.Verifier.verify_response (public API)",
                lambda: verifier.verify_response(text, at=now))
    internal = DocumentVerifier(load_trust(pinned or bundled_pinned_dir()))
    policy = VerificationPolicy()
    internal.verify(decode(text), policy=policy, now=now)
    internal_entry = ("attest_service.verify.DocumentVerifier.verify(decode(...)) "
                      "(internal path: this tree has no public Verifier.verify_response yet)")
    return (internal_entry,
            lambda: internal.verify(decode(text), policy=policy, now=now))


def distinct_documents(count: int, seconds: float, rounds: int) -> tuple[float, float]:
    """Documents/s over ``count`` different documents of one generated signer, and that signer's bare RSA/s."""
    now = datetime.now(UTC).replace(microsecond=0)
    root, issuing_ca, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=now)
    rng = random.Random(1)
    texts = []
    for _ in range(count):
        content = pki.attested_content(
            nonce="".join(rng.choice("0123456789") for _ in range(14)), vm_id=str(uuid.UUID(int=rng.getrandbits(128))),
            subscription_id=str(uuid.UUID(int=rng.getrandbits(128))), sku="", plan=("", "", ""), license_type="",
            created_on=now - timedelta(seconds=rng.randint(0, 300)), expires_on=now + timedelta(hours=6))
        der = pki.sign_attested(content, signer=leaf)
        texts.append(json.dumps({"encoding": "pkcs7", "signature": base64.b64encode(der).decode("ascii")}))
    with tempfile.TemporaryDirectory() as pinned:
        pki.write_pinned_dir(Path(pinned), "public", root=root.certificate, intermediates=[issuing_ca.certificate])
        verifier = attest_service.Verifier.from_directory(pinned)
    documents = itertools.cycle(texts)
    signed = parse_signed_data(decode(texts[0]))
    key = leaf.certificate.public_key()
    assert isinstance(key, rsa.RSAPublicKey)

    def verify_bare() -> None:
        key.verify(signed.signature, signed.content, padding.PKCS1v15(), hashes.SHA256())

    document_rates, bare_rates = [], []
    for _ in range(rounds):
        document_rates.append(rate(lambda: verifier.verify_response(next(documents), at=now), seconds))
        bare_rates.append(rate(verify_bare, seconds))
    return max(document_rates), max(bare_rates)


def rate(operation: Callable[[], object], seconds: float) -> float:
    """Operations per second over about ``seconds`` of wall time (after a short warm-up)."""
    for _ in range(200):
        operation()
    count = 0
    batch = 500
    start = time.perf_counter()
    while True:
        for _ in range(batch):
            operation()
        count += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="measuring time per round and figure (default 1.5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    parser.add_argument("--profile", action="store_true", help="print a cProfile breakdown of verifications")
    parser.add_argument("--distinct", type=int, default=0, metavar="N",
                        help="also time N different documents of one generated signer, each verified in turn")
    parser.add_argument("--iterations", type=int, default=0,
                        help="only verify this many times, printing nothing (for valgrind --tool=callgrind)")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    label, raw, pinned, now = pick_document()
    # The service receives the response JSON; the timed operation starts from it, as a request does.
    text = raw.decode("utf-8")
    entry, verify_document = document_operation(text, pinned, now)
    if args.iterations:
        for _ in range(args.iterations):
            verify_document()
        return 0

    signed = parse_signed_data(decode(text))
    # Azure's documents (and the generated base one) carry the signer certificate only.
    signer_key = x509.load_der_x509_certificate(signed.certificates[0]).public_key()
    if not isinstance(signer_key, rsa.RSAPublicKey):
        print(f"{label}: the signer key is not RSA; the bare comparison needs an RSA document")
        return 1

    def verify_bare() -> None:
        signer_key.verify(signed.signature, signed.content, padding.PKCS1v15(), hashes.SHA256())

    documents: list[float] = []
    bare: list[float] = []
    for _ in range(args.rounds):
        documents.append(rate(verify_document, args.seconds))
        bare.append(rate(verify_bare, args.seconds))
    ratio = max(documents) / max(bare)
    print(f"document:                 {label}, {signer_key.key_size}-bit RSA, {len(raw)} bytes of JSON")
    print(f"entry point:              {entry}")
    print(f"documents verified/s:     {max(documents):10,.0f}   (rounds: {', '.join(f'{r:,.0f}' for r in documents)})")
    print(f"bare RSA verifications/s: {max(bare):10,.0f}   (rounds: {', '.join(f'{r:,.0f}' for r in bare)})")
    print(f"per document:             {1e6 / max(documents):10.1f} us, of which bare RSA {1e6 / max(bare):.1f} us")
    print(targets.CORE_RATIO.line(ratio, note=f"(one core, best of {args.rounds} alternating rounds)"))
    if args.distinct:
        distinct, distinct_bare = distinct_documents(args.distinct, args.seconds, args.rounds)
        print(f"distinct documents/s:     {distinct:10,.0f}   ({args.distinct} documents of one generated signer, "
              f"{1e6 / distinct:.1f} us each, of which bare RSA {1e6 / distinct_bare:.1f} us)")
        print(targets.named(targets.CORE_RATIO, "distinct/bare RSA ratio").line(distinct / distinct_bare))
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
