"""The IMDS emulator over real HTTP on loopback: each IMDS rule, each fault, and the command."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography import x509

from attest_service.errors import ConfigurationError
from attest_service.imds import pki
from attest_service.imds.emulator import (
    DEFAULT_INSTANCE,
    EmulatorPki,
    EmulatorSettings,
    Fault,
    create_app,
    parse_bind,
)
from attest_service.trust import load_trust
from attest_service.verify import DocumentVerifier, VerificationPolicy, decode

from .conftest import REPO_ROOT
from .servers import FakeClock, emulator, http_get

META = {"Metadata": "true"}
DOC = "/metadata/attested/document?api-version=2021-02-01"
INSTANCE = "/metadata/instance"
V = "api-version=2021-02-01"


def _claims(body: bytes) -> dict[str, object]:
    signature = json.loads(body)["signature"]
    info = cms.ContentInfo.load(base64.b64decode(signature))
    claims: dict[str, object] = json.loads(info["content"]["encap_content_info"]["content"].native)
    return claims


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def imds(emulator_signing: EmulatorPki, clock: FakeClock):
    with emulator(EmulatorSettings(), emulator_signing, clock=clock) as running:
        yield running


# --- rule 1: headers ------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Metadata": "false"}, {"Metadata": "yes"}])
def test_metadata_header_is_required(imds, headers: dict[str, str]) -> None:
    status, body, content_type = http_get(imds.url + DOC, headers)
    assert status == 400
    assert content_type.startswith("application/json")
    assert "metadata header" in json.loads(body)["error"]


def test_metadata_header_value_is_case_insensitive(imds) -> None:
    assert http_get(imds.url + DOC, {"Metadata": "True"})[0] == 200


def test_x_forwarded_for_is_refused(imds) -> None:
    status, body, _ = http_get(imds.url + DOC, {**META, "X-Forwarded-For": "10.0.0.1"})
    assert status == 400
    assert "X-Forwarded-For" in json.loads(body)["error"]


# --- rule 2: api-version --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/metadata/attested/document",
        "/metadata/attested/document?api-version=2099-01-01",
        "/metadata/attested/document?api-version=2018-02-01",  # exists, but predates attested data
        "/metadata/instance",
        "/metadata/instance/compute/vmId?format=text",
    ],
)
def test_api_version_missing_or_unknown_lists_the_newest(imds, path: str) -> None:
    status, body, _ = http_get(imds.url + path, META)
    assert status == 400
    answer = json.loads(body)
    assert "api-version" in answer["error"]
    assert answer["newest-versions"] == ["2024-03-15", "2023-11-15", "2023-07-01"]


def test_versions_needs_no_api_version(imds) -> None:
    status, body, _ = http_get(imds.url + "/metadata/versions", META)
    assert status == 200
    assert "2021-02-01" in json.loads(body)["apiVersions"]
    assert http_get(imds.url + "/metadata/versions", {})[0] == 400


# --- rule 3: duplicate parameters -----------------------------------------------------------------


@pytest.mark.parametrize("query", ["&nonce=a&nonce=b", "&api-version=2021-02-01"])
def test_duplicate_query_parameters_are_refused(imds, query: str) -> None:
    status, body, _ = http_get(imds.url + DOC + query, META)
    assert status == 400
    assert "more than once" in json.loads(body)["error"]


# --- rule 4: rate limit ---------------------------------------------------------------------------


def test_more_than_five_requests_per_second_are_throttled(imds, clock: FakeClock) -> None:
    statuses = [http_get(imds.url + "/metadata/versions", META)[0] for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    clock.now += 0.5
    assert http_get(imds.url + "/metadata/versions", META)[0] == 429
    clock.now += 0.6
    assert http_get(imds.url + "/metadata/versions", META)[0] == 200


@pytest.mark.slow
def test_rate_limit_with_the_real_clock(emulator_signing: EmulatorPki) -> None:
    with emulator(EmulatorSettings(), emulator_signing) as running:
        statuses = [http_get(running.url + "/metadata/versions", META)[0] for _ in range(8)]
    assert statuses.count(429) >= 2
    assert statuses[:5] == [200] * 5


# --- rule 5: attested document --------------------------------------------------------------------


def test_attested_document_verifies_with_the_pinned_directory(imds, emulator_pki_dir: Path) -> None:
    status, body, content_type = http_get(imds.url + DOC + "&nonce=challenge-1", META)
    assert status == 200
    assert content_type.startswith("application/json")
    assert json.loads(body)["encoding"] == "pkcs7"
    result = DocumentVerifier(load_trust(emulator_pki_dir)).verify(
        decode(body),
        policy=VerificationPolicy(cloud="public", expected_nonce="challenge-1"),
        now=datetime.now(UTC),
    )
    compute = DEFAULT_INSTANCE["compute"]
    assert isinstance(compute, dict)
    assert result.to_dict()["claims"]["vmId"] == compute["vmId"]


def test_default_nonce_is_the_expiry_instant(emulator_signing: EmulatorPki) -> None:
    fixed = datetime(2026, 6, 25, 18, 56, 45, 123456, tzinfo=UTC)
    app = create_app(EmulatorSettings(), emulator_signing, clock=lambda: fixed)
    response = app.test_client().get(DOC, headers=META)
    claims = _claims(response.data)
    assert claims["nonce"] == "20260626-005645"
    assert claims["timeStamp"] == {"createdOn": "06/25/26 18:56:45 -0000", "expiresOn": "06/26/26 00:56:45 -0000"}
    assert list(claims) == ["licenseType", "nonce", "plan", "sku", "subscriptionId", "timeStamp", "vmId"]


@pytest.mark.parametrize("nonce", ["x" * 33, "bad%0Anonce"])
def test_unusable_nonce_is_refused(imds, nonce: str) -> None:
    assert http_get(imds.url + DOC + "&nonce=" + nonce, META)[0] == 400


def test_signer_is_shaped_like_azure(emulator_signing: EmulatorPki) -> None:
    leaf = emulator_signing.leaf.certificate
    assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "metadata.azure.com"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["eastus.metadata.azure.com", "metadata.azure.com"]


# --- instance metadata ----------------------------------------------------------------------------


def test_instance_document(imds) -> None:
    status, body, _ = http_get(f"{imds.url}{INSTANCE}?{V}", META)
    assert status == 200
    assert json.loads(body) == DEFAULT_INSTANCE


def test_route_parameter_filtering(imds) -> None:
    status, body, _ = http_get(f"{imds.url}{INSTANCE}/compute/plan?{V}", META)
    assert (status, json.loads(body)["publisher"]) == (200, "emulated-publisher")
    status, body, content_type = http_get(f"{imds.url}{INSTANCE}/compute/vmId?{V}&format=text", META)
    assert (status, body) == (200, b"00000000-0000-4000-8000-000000000002")
    assert content_type.startswith("text/plain")
    path = "network/interface/0/ipv4/ipAddress/0/privateIpAddress"
    assert http_get(f"{imds.url}{INSTANCE}/{path}?{V}&format=text", META)[1] == b"10.0.0.4"


def test_leaf_as_json(imds) -> None:
    status, body, _ = http_get(f"{imds.url}{INSTANCE}/compute/location?{V}", META)
    assert (status, json.loads(body)) == (200, "eastus")


def test_text_on_a_non_leaf_is_refused(imds) -> None:
    status, body, _ = http_get(f"{imds.url}{INSTANCE}/compute?{V}&format=text", META)
    assert status == 400
    assert "leaf" in json.loads(body)["error"]


@pytest.mark.parametrize("path", ["compute/nothing", "network/interface/7", "compute/vmId/deeper"])
def test_unknown_route_is_404(imds, path: str) -> None:
    assert http_get(f"{imds.url}{INSTANCE}/{path}?{V}", META)[0] == 404


def test_unknown_format_is_refused(imds) -> None:
    assert http_get(f"{imds.url}{INSTANCE}/compute/vmId?{V}&format=xml", META)[0] == 400


def test_other_paths_and_methods(imds) -> None:
    assert http_get(f"{imds.url}/metadata/identity?{V}", META)[0] == 404
    request = urllib.request.Request(imds.url + DOC, data=b"", headers=META, method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 405
    caught.value.close()


# --- faults ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "status"), [("410", 410), ("500", 500)])
def test_status_faults_answer_the_first_requests(
    emulator_signing: EmulatorPki, clock: FakeClock, fault: str, status: int
) -> None:
    settings = EmulatorSettings(faults=[Fault.parse(f"{fault}:2")], max_requests_per_second=100)
    with emulator(settings, emulator_signing, clock=clock) as running:
        # A refused request (no header) does not consume a fault: IMDS would not have served it.
        assert http_get(running.url + DOC, {})[0] == 400
        statuses = [http_get(running.url + DOC, META)[0] for _ in range(3)]
    assert statuses == [status, status, 200]


@pytest.mark.slow
def test_cached_nonce_fault_hands_back_an_old_document(emulator_signing: EmulatorPki, clock: FakeClock) -> None:
    settings = EmulatorSettings(faults=[Fault.parse("cached-nonce:2")])
    with emulator(settings, emulator_signing, clock=clock) as running:
        nonces = [_claims(http_get(running.url + DOC + f"&nonce=n{i}", META)[1])["nonce"] for i in range(3)]
    assert nonces[0] == nonces[1] != "n0"
    assert nonces[2] == "n2"


@pytest.mark.parametrize("text", ["teapot", "410:0", "410:x", "cached-nonce:-1"])
def test_bad_fault_is_a_configuration_error(text: str) -> None:
    with pytest.raises(ConfigurationError):
        Fault.parse(text)


def test_fault_count_defaults_to_one() -> None:
    assert Fault.parse("cached-nonce") == Fault(kind="cached-nonce", count=1)


# --- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "instance",
    [{}, {"compute": []}, {"compute": {"vmId": "v"}}, {"compute": {**DEFAULT_INSTANCE["compute"], "plan": {}}}],  # type: ignore[dict-item]
)
def test_instance_without_signed_fields_is_refused(instance: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        EmulatorSettings(instance=instance)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), (":0", ("127.0.0.1", 0)), ("[::1]:9", ("::1", 9))],
)
def test_parse_bind(text: str, expected: tuple[str, int]) -> None:
    assert parse_bind(text) == expected


@pytest.mark.parametrize("text", ["localhost", "host:", "host:99999", "host:x"])
def test_parse_bind_refuses(text: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_bind(text)


# --- the command ----------------------------------------------------------------------------------


def _command_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_command_serves_the_instance_file_and_pins_its_pki(tmp_path: Path) -> None:
    instance = json.loads(json.dumps(DEFAULT_INSTANCE))
    instance["compute"].update(vmId="vm-from-file", location="usgovvirginia", sku="gold")
    instance_file = tmp_path / "instance.json"
    instance_file.write_text(json.dumps(instance))
    pki_dir = tmp_path / "pki"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "attest_service", "imds-emulator", "--bind", "127.0.0.1:0",
            "--pki-dir", str(pki_dir), "--cloud", "usgov", "--instance-file", str(instance_file),
            "--fault", "410", "cached-nonce:1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=_command_env(),
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        started = json.loads(process.stdout.readline())
        assert started["event"] == "listening"
        url = started["url"]
        assert http_get(url + DOC, META)[0] == 410
        assert _claims(http_get(url + DOC + "&nonce=abc", META)[1])["nonce"] != "abc"
        _status, body, _ = http_get(url + DOC + "&nonce=abc", META)
        claims = _claims(body)
        assert (claims["nonce"], claims["vmId"], claims["sku"]) == ("abc", "vm-from-file", "gold")
        roots = list((pki_dir / "usgov" / "roots").glob("*.pem"))
        assert len(roots) == 1
        assert len(list((pki_dir / "usgov" / "intermediates").glob("*.pem"))) == 1
        result = DocumentVerifier(load_trust(pki_dir)).verify(
            decode(body), policy=VerificationPolicy(cloud="usgov"), now=datetime.now(UTC)
        )
        assert "usgovvirginia.metadata.azure.us" in result.to_dict()["signer"]["dnsNames"]
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    assert returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "arguments",
    [
        ["--bind", "nowhere"],
        ["--bind", "127.0.0.1:0", "--fault", "teapot"],
        ["--bind", "127.0.0.1:0", "--cloud", "mars"],
    ],
)
def test_command_usage_errors(tmp_path: Path, arguments: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "attest_service", "imds-emulator", "--pki-dir", str(tmp_path), *arguments],
        capture_output=True,
        env=_command_env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "address already in use"),  # the port is held by the test's own listener
        ("192.0.2.1", "cannot assign requested address"),  # documentation range: no interface of this machine
    ],
)
def test_a_bind_that_fails_is_a_usage_error_of_ours(tmp_path: Path, host: str, reason: str) -> None:
    pki_dir = tmp_path / "pki"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "attest_service", "imds-emulator", "--bind", f"{host}:{port}",
             "--pki-dir", str(pki_dir)],
            capture_output=True, env=_command_env(), timeout=30, check=False, text=True,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    # One sentence of ours naming the address and the reason; not werkzeug's advice, no traceback.
    assert result.stderr == f"attest-service imds-emulator: cannot listen on {host}:{port}: {reason}\n"
    assert result.stdout == ""
    # Bound before the PKI is written: a second emulator must not replace the pins of one already serving.
    assert not pki_dir.exists()


def test_generated_pki_is_new_each_start() -> None:
    first = EmulatorPki.generate(EmulatorSettings(), datetime.now(UTC))
    second = EmulatorPki.generate(EmulatorSettings(), datetime.now(UTC))
    assert first.root.certificate != second.root.certificate
    assert first.leaf.certificate.not_valid_after_utc - first.leaf.certificate.not_valid_before_utc == (
        pki.LEAF_VALIDITY + pki.CERTIFICATE_BACKDATE
    )
