"""The fuzz target of the document path, its trust material, and its seed corpus.

One fuzz input is one call of :func:`check_one`. Its first byte is a selector, the rest the document:

* bits 0-3 pick the verification instant from :data:`INSTANTS` (modulo its length): the instant of the
  generated fuzz PKI and the instants at which each real Azure document is valid, so that mutations of
  every seed reach the steps after the chain (claims, time window, nonce) instead of all stopping at
  ``certificate_expired``;
* bits 4-6 pick the policy's cloud from :data:`CLOUD_CHOICES` and whether a nonce is expected;
* bit 7 picks the form: set, the rest is raw DER that the target base64-encodes (so mutations land in
  the ASN.1, not in the base64 alphabet); clear, the rest is what a caller would send as is (the IMDS
  response JSON or bare base64).

The input then goes through exactly what the service and the CLI run: ``decode`` and then
``DocumentVerifier(trust).verify(...)``. Any exception other than
:class:`~attest_service.errors.VerificationError` is a crash. Warnings are errors here, as in the test
suite, so a warning escaping the core is reported too.

The trust is the bundled ``pinned_certs/`` plus one extra public root and issuing CA: a fuzz PKI built
from fixed ECDSA keys and fixed serials and instants, so its documents are byte-identical on every run
and a crash found through one of them replays anywhere. Real documents come from
``$ATTEST_AZURE_REAL_DIR`` (default ``../shared/azure-real`` next to the repository) when present; they
are read at run time and never copied into the repository.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import shutil
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from attest_service.errors import VerificationError
from attest_service.imds import pki
from attest_service.trust import TrustStore, bundled_pinned_dir, load_trust
from attest_service.verify import DocumentVerifier, VerificationPolicy, decode
from tests.support.azure_real import azure_real_dir

REPO_ROOT: Final = Path(__file__).resolve().parents[3]
REGRESSIONS_DIR: Final = Path(__file__).resolve().parent / "regressions"
TESTCASES_DIR: Final = REPO_ROOT / "tests" / "assets" / "testcases"

#: The instant the fuzz PKI and its documents are built around.
FUZZ_NOW: Final = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)

#: Verification instants: the fuzz PKI's, then one inside each real Azure document's validity (the
#: instants ``azure-real/documents/expected.json`` gives) and the test-case generator's (2025-06-01).
#: Fixed here so that a saved crash input replays to the same instant whatever seeds are present.
INSTANTS: Final = (
    FUZZ_NOW + timedelta(minutes=1),
    datetime(2019, 12, 13, 0, 34, 40, tzinfo=UTC),
    datetime(2021, 1, 4, 13, 56, 34, tzinfo=UTC),
    datetime(2021, 4, 21, 18, 10, 27, tzinfo=UTC),
    datetime(2023, 1, 5, 10, 42, 55, tzinfo=UTC),
    datetime(2023, 10, 31, 15, 31, 11, tzinfo=UTC),
    datetime(2024, 6, 28, 10, 11, 14, tzinfo=UTC),
    datetime(2025, 4, 23, 16, 24, 58, tzinfo=UTC),
    datetime(2025, 6, 1, 12, 1, 0, tzinfo=UTC),
    datetime(2025, 8, 19, 19, 5, 40, tzinfo=UTC),
    datetime(2026, 4, 23, 15, 50, 58, tzinfo=UTC),
    datetime(2026, 6, 25, 18, 57, 45, tzinfo=UTC),
)

#: Policy clouds the selector's bits 4-5 choose from.
CLOUD_CHOICES: Final = ("auto", "public", "usgov", "china")
#: The nonce expected when the selector's bit 6 is set (it is the one the fuzz documents sign).
EXPECTED_NONCE: Final = "fuzz-nonce-0001"

_INSTANT_MASK: Final = 0x0F
_CLOUD_SHIFT: Final = 4
_CLOUD_MASK: Final = 0x03
_NONCE_BIT: Final = 0x40
_DER_BIT: Final = 0x80

#: Scalars of the fuzz PKI's ECDSA keys (P-256). Fixed on purpose: they make the fuzz PKI reproducible;
#: they protect nothing.
_ROOT_SCALAR: Final = 0x5EED_0001
_CA_SCALAR: Final = 0x5EED_0002
_LEAF_SCALAR: Final = 0x5EED_0003
_SHA256_OID: Final = "2.16.840.1.101.3.4.2.1"

#: Regression inputs (file stem under ``regressions/``) whose bug is not fixed yet, with the signature
#: of their crash. Their tests are expected to fail (strictly: a fix makes them pass, and the entry must
#: then go), and bounded fuzz runs count these signatures instead of stopping on them.
OPEN_CRASHES: Final[dict[str, str]] = {}

class Crash(AssertionError):
    """An input made the document path raise something other than a VerificationError."""

    @property
    def signature(self) -> str:
        """``Type@module:function`` of the escaping exception at its innermost project frame.

        Stable across inputs that hit the same bug, so a known, still open crash can be recognised.
        """
        cause = self.__cause__
        if cause is None:
            return "unknown"
        where = "?"
        for frame in traceback.extract_tb(cause.__traceback__):
            path = Path(frame.filename)
            if "attest_service" in path.parts:
                relative = path.parts[path.parts.index("attest_service") + 1:]
                where = f"{'/'.join(relative)}:{frame.name}"
        return f"{type(cause).__name__}@{where}"


@dataclass(frozen=True, slots=True, kw_only=True)
class FuzzPki:
    """The deterministic fuzz PKI: its root, issuing CA and two signers (public and usgov names)."""

    root: pki.CertifiedKey
    issuing_ca: pki.CertifiedKey
    public_leaf: pki.CertifiedKey
    usgov_leaf: pki.CertifiedKey


def _key(scalar: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(scalar, ec.SECP256R1())


def fuzz_pki() -> FuzzPki:
    """Build the fuzz PKI; the same certificates, byte for byte, on every call."""
    start = FUZZ_NOW - timedelta(days=30)
    end = FUZZ_NOW + timedelta(days=365)
    root = pki.make_root(common_name="Attest Fuzz Root CA", key=_key(_ROOT_SCALAR), not_before=start,
                         not_after=end, serial=0x0F0001)
    issuing_ca = pki.make_intermediate(common_name="Attest Fuzz Issuing CA", key=_key(_CA_SCALAR), issuer=root,
                                       not_before=start, not_after=end, serial=0x0F0002)
    public_leaf = pki.make_leaf(dns_names=["eastus.metadata.azure.com", "metadata.azure.com"],
                                common_name="metadata.azure.com", key=_key(_LEAF_SCALAR), issuer=issuing_ca,
                                not_before=start, not_after=end, serial=0x0F0003)
    usgov_leaf = pki.make_leaf(dns_names=["metadata.azure.us"], common_name="metadata.azure.us",
                               key=_key(_LEAF_SCALAR), issuer=issuing_ca, not_before=start, not_after=end,
                               serial=0x0F0004)
    return FuzzPki(root=root, issuing_ca=issuing_ca, public_leaf=public_leaf, usgov_leaf=usgov_leaf)


def build_trust_dir(directory: Path) -> Path:
    """Write the bundled pins, the test-case generator's pins and the fuzz PKI into ``directory``."""
    shutil.copytree(bundled_pinned_dir(), directory, dirs_exist_ok=True)
    if (TESTCASES_DIR / "pinned").is_dir():
        shutil.copytree(TESTCASES_DIR / "pinned", directory, dirs_exist_ok=True)
    material = fuzz_pki()
    for cloud in ("public", "usgov"):
        pki.write_pinned_dir(directory, cloud, root=material.root.certificate,
                             intermediates=[material.issuing_ca.certificate])
    return directory


_TRUST: TrustStore | None = None
_VERIFIER: DocumentVerifier | None = None


def verifier() -> DocumentVerifier:
    """The DocumentVerifier every input goes through, built once per process (as a service worker does)."""
    global _TRUST, _VERIFIER  # noqa: PLW0603 - one per process, like a worker's; built on first use
    if _VERIFIER is None:
        with tempfile.TemporaryDirectory(prefix="attest-fuzz-trust-") as tmp:
            _TRUST = load_trust(build_trust_dir(Path(tmp) / "pinned"))
        _VERIFIER = DocumentVerifier(_TRUST)
    return _VERIFIER


def split(data: bytes) -> tuple[datetime, VerificationPolicy, bytes | str]:
    """Read the selector byte of a fuzz input: the instant, the policy and the document to decode."""
    if not data:
        return INSTANTS[0], VerificationPolicy(), b""
    selector, body = data[0], data[1:]
    instant = INSTANTS[(selector & _INSTANT_MASK) % len(INSTANTS)]
    cloud = CLOUD_CHOICES[(selector >> _CLOUD_SHIFT) & _CLOUD_MASK]
    nonce = EXPECTED_NONCE if selector & _NONCE_BIT else None
    document: bytes | str = base64.b64encode(body).decode("ascii") if selector & _DER_BIT else body
    return instant, VerificationPolicy(cloud=cloud, expected_nonce=nonce), document


def check_one(data: bytes) -> str:
    """Run one fuzz input through the document path; return ``"verified"`` or the refusal's code.

    Raises :class:`Crash` (chained to the original) for any exception that is not a VerificationError.
    """
    instant, policy, document = split(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            der = decode(document)
            verifier().verify(der, policy=policy, now=instant)
    except VerificationError as exc:
        return exc.code
    except Exception as exc:
        raise Crash(f"{type(exc).__name__}: {exc}") from exc
    return "verified"


def selector(*, instant: int = 0, cloud: str = "auto", nonce: bool = False, der: bool = True) -> int:
    """The selector byte for an instant index, a policy cloud, an expected nonce and a form."""
    value = instant | (CLOUD_CHOICES.index(cloud) << _CLOUD_SHIFT)
    if nonce:
        value |= _NONCE_BIT
    if der:
        value |= _DER_BIT
    return value


# --- seed corpus ------------------------------------------------------------------------------------


def _fuzz_documents() -> Iterator[tuple[str, bytes, int]]:
    """Generated documents: (name, DER, selector) covering the shapes the verifier distinguishes."""
    material = fuzz_pki()
    created = FUZZ_NOW - timedelta(minutes=5)

    def content(nonce: str = EXPECTED_NONCE, *, created_on: datetime = created) -> bytes:
        return pki.attested_content(nonce=nonce, vm_id="0f0f0f0f-0000-4000-8000-000000000001",
                                    subscription_id="0f0f0f0f-0000-4000-8000-000000000002", sku="fuzz-sku",
                                    plan=("plan", "product", "publisher"), license_type="",
                                    created_on=created_on, expires_on=created_on + pki.DOCUMENT_LIFETIME)

    sign = pki.sign_attested
    leaf = material.public_leaf
    yield "fuzz-valid", sign(content(), signer=leaf, digest_oid=_SHA256_OID), selector(nonce=True)
    yield "fuzz-valid-public", sign(content(), signer=leaf, digest_oid=_SHA256_OID), selector(cloud="public")
    yield "fuzz-usgov", sign(content(), signer=material.usgov_leaf, digest_oid=_SHA256_OID), selector()
    yield ("fuzz-signed-attributes",
           sign(content(), signer=leaf, digest_oid=_SHA256_OID, signed_attributes=True, signing_time=created),
           selector())
    yield ("fuzz-extra-certificates",
           sign(content(), signer=leaf, digest_oid=_SHA256_OID,
                extra_certificates=[material.issuing_ca.certificate, material.root.certificate]),
           selector())
    yield "fuzz-sha384", sign(content(), signer=leaf, digest_oid=_SHA256_OID, hash_name="sha384"), selector()
    yield "fuzz-expired", sign(content(created_on=created - timedelta(days=1)), signer=leaf,
                               digest_oid=_SHA256_OID), selector()
    yield "fuzz-other-nonce", sign(content("another"), signer=leaf, digest_oid=_SHA256_OID), selector(nonce=True)
    yield "fuzz-wrong-cloud", sign(content(), signer=leaf, digest_oid=_SHA256_OID), selector(cloud="china")


def _real_documents(directory: Path) -> Iterator[tuple[str, bytes, int]]:
    """Real documents (and the published negatives), each with the selector of its own instant."""
    documents = directory / "documents"
    expected_file = documents / "expected.json"
    if expected_file.is_file():
        for entry in json.loads(expected_file.read_text()):
            instant = datetime.fromisoformat(entry["verify_at"].replace("Z", "+00:00"))
            index = INSTANTS.index(instant) if instant in INSTANTS else 0
            response = json.loads((documents / entry["document"]).read_text())
            name = "real-" + entry["document"].removesuffix(".json")
            yield name, base64.b64decode(response["signature"]), selector(instant=index)
    negatives = directory / "negative"
    for path in sorted(negatives.glob("*.json")) if negatives.is_dir() else ():
        response = json.loads(path.read_text())
        yield "negative-" + path.stem, base64.b64decode(response["signature"]), selector(instant=1)
    for path in sorted(negatives.glob("*.pem")) if negatives.is_dir() else ():
        body = "".join(line for line in path.read_text().splitlines() if not line.startswith("-----"))
        try:
            yield "negative-" + path.stem, base64.b64decode(body), selector(instant=2)
        except binascii.Error:
            continue


def _testcase_documents() -> Iterator[tuple[str, bytes, int]]:
    """Documents of the checked-in test-case generator, each with its instant, cloud and nonce."""
    index_file = TESTCASES_DIR / "index.json"
    if not index_file.is_file():
        return
    for name, case in sorted(json.loads(index_file.read_text())["cases"].items()):
        instant = datetime.fromisoformat(case["at"])
        policy = case.get("policy", {})
        cloud = policy.get("cloud", "auto")
        sel = selector(instant=INSTANTS.index(instant) if instant in INSTANTS else 0,
                       cloud=cloud if cloud in CLOUD_CHOICES else "auto", der=False)
        data = (TESTCASES_DIR / case["file"]).read_bytes()
        try:
            der = decode(data)
        except VerificationError:
            # Cases about the input layer (bad base64, wrong encoding) are seeds in the caller's form only.
            yield "testcase-" + name, data, sel
            continue
        yield "testcase-" + name, der, sel | _DER_BIT


def seed_inputs() -> Iterator[tuple[str, bytes]]:
    """Every seed as ``(name, fuzz input)``: generated, test-case and (when present) real documents."""
    for name, der, sel in (*_fuzz_documents(), *_testcase_documents(), *_real_documents(azure_real_dir())):
        yield name, bytes([sel]) + der
        if sel & _DER_BIT:
            # The same document in the caller's JSON form, so the JSON and base64 layers are mutated too.
            response = json.dumps({"encoding": "pkcs7", "signature": base64.b64encode(der).decode("ascii")})
            yield name + "-json", bytes([sel & ~_DER_BIT]) + response.encode("ascii")


def write_seed_corpus(directory: Path) -> int:
    """Write every seed into ``directory`` (file name: the input's SHA-256); return how many were written."""
    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    for _name, data in seed_inputs():
        (directory / hashlib.sha256(data).hexdigest()).write_bytes(data)
        count += 1
    return count
