"""What a large CRL costs: its load time and memory per worker, and the core ratio with CRLs present.

A generated Azure-shaped PKI (RSA-2048, as Azure's) gets a CRL of its issuing CA with ``--entries`` revoked
serial numbers (default 100,000, about 5 MB in DER: the size of a busy issuing CA's CRL) and a small CRL of
its root, both current. Then:

1. Load, each in a fresh process (a worker's view): the trust directory without the CRLs and with them, the
   time of ``load_trust`` (parsing and checking the signature of each CRL and building its set of serial
   numbers) and the resident memory after it; the difference is what the CRLs cost per worker. A second load
   in the same process (the reload after a change elsewhere in the directory) reuses the parsed CRL.
2. The core ratio of ``bench_verify.py`` (documents verified per second over bare RSA-2048 verifications of
   the same signature, one core, best of alternating rounds) for one document of the generated signer, with no
   CRL, with the CRLs in ``soft`` mode and in ``hard`` mode: the lookup is a set membership per certificate
   on the path, so the ratio should not move.

Prints figures; asserts nothing. Run: ``python benchmarks/bench_crl.py [--entries N] [--seconds S] [--rounds N]``
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(BENCH_DIR))

import targets  # noqa: E402
from bench_verify import rate  # noqa: E402

import attest_service  # noqa: E402
from attest_service.imds import pki  # noqa: E402
from attest_service.verify import decode  # noqa: E402
from attest_service.verify.pkcs7 import parse_signed_data  # noqa: E402
from tests.support import crls  # noqa: E402


def _resident_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def child(directory: str) -> None:
    """In a fresh process: load ``directory`` twice; print JSON with the times and the resident memory."""
    from attest_service.trust import load_trust  # noqa: PLC0415 - imported before the baseline is read

    before = _resident_bytes()
    started = time.perf_counter()
    trust = load_trust(Path(directory))
    first = time.perf_counter() - started
    after = _resident_bytes()
    started = time.perf_counter()
    load_trust(Path(directory))
    second = time.perf_counter() - started
    entries = sum(len(crl.serials) for cloud in trust.clouds.values() for crl in cloud.crls)
    print(json.dumps({"first": first, "second": second, "before": before, "after": after, "entries": entries}))


def _load_in_child(directory: Path) -> dict[str, float]:
    completed = subprocess.run([sys.executable, __file__, "--child", str(directory)], capture_output=True, text=True,
                               check=True, timeout=600)
    result: dict[str, float] = json.loads(completed.stdout)
    return result


def main() -> int:
    """Build the PKI and the CRLs, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000, help="revoked serials in the issuing CA's CRL")
    parser.add_argument("--seconds", type=float, default=1.0, help="measuring time per round (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    parser.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    now = datetime.now(UTC).replace(microsecond=0)
    root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=now)
    content = pki.attested_content(nonce="1234567890", vm_id="00000000-0000-4000-8000-000000000001",
                                   subscription_id="00000000-0000-4000-8000-000000000002", sku="", plan=("", "", ""),
                                   license_type="", created_on=now - timedelta(minutes=1),
                                   expires_on=now + timedelta(hours=6))
    der = pki.sign_attested(content, signer=leaf)
    text = json.dumps({"encoding": "pkcs7", "signature": base64.b64encode(der).decode("ascii")})
    with tempfile.TemporaryDirectory() as work:
        plain, with_crls = Path(work) / "plain", Path(work) / "crls"
        for directory in (plain, with_crls):
            pki.write_pinned_dir(directory, "public", root=root.certificate, intermediates=[issuing.certificate])
        folder = with_crls / "public" / "crls"
        folder.mkdir()
        started = time.perf_counter()
        large = crls.make_large_crl(issuing, entries=args.entries, now=now)
        built = time.perf_counter() - started
        (folder / "issuing-ca.crl").write_bytes(large)
        (folder / "root.crl").write_bytes(crls.der(crls.make_crl(root, now=now)))

        without = _load_in_child(plain)
        loaded = _load_in_child(with_crls)
        memory = (loaded["after"] - loaded["before"]) - (without["after"] - without["before"])
        print(f"CRL of the issuing CA:    {int(loaded['entries']) - 0:,} entries in all, {len(large) / 1e6:.1f} MB DER "
              f"(built in {built:.1f} s)")
        print(f"load_trust, fresh worker: {without['first'] * 1e3:8.1f} ms without CRLs, "
              f"{loaded['first'] * 1e3:8.1f} ms with them")
        print(f"load_trust, reload:       {without['second'] * 1e3:8.1f} ms without CRLs, "
              f"{loaded['second'] * 1e3:8.1f} ms with them (the parsed CRL is reused)")
        print(f"memory per worker:        {memory / 2**20:8.1f} MiB resident for the CRLs "
              f"({memory / max(1, loaded['entries']):.0f} bytes an entry)")

        signed = parse_signed_data(decode(text))
        key = leaf.certificate.public_key()
        assert isinstance(key, rsa.RSAPublicKey)

        def bare() -> None:
            key.verify(signed.signature, signed.content, padding.PKCS1v15(), hashes.SHA256())

        cases = [("no CRL", plain, "soft"), ("CRLs, soft", with_crls, "soft"), ("CRLs, hard", with_crls, "hard")]
        verifiers = {}
        for name, directory, mode in cases:
            verifier = attest_service.Verifier.from_directory(directory)
            result = verifier.verify_response(text, at=now, revocation=mode)
            assert result.revocation_unknown == (2 if directory is plain else 0), (name, result.revocation_unknown)
            verifiers[name] = (verifier, mode)
        best: dict[str, float] = {name: 0.0 for name, _, _ in cases}
        best_bare = 0.0
        for _ in range(args.rounds):
            for name, (verifier, mode) in verifiers.items():
                best[name] = max(best[name], rate(lambda v=verifier, m=mode: v.verify_response(text, at=now,
                                                                                              revocation=m),
                                                  args.seconds))
            best_bare = max(best_bare, rate(bare, args.seconds))
        print(f"bare RSA verifications/s: {best_bare:10,.0f}")
        for name, _, _ in cases:
            print(f"documents/s, {name + ':':12} {best[name]:10,.0f}   ({1e6 / best[name]:.1f} us each)   "
                  + targets.named(targets.CORE_RATIO, f"core ratio, {name}").line(best[name] / best_bare))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
