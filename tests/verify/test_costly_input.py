"""Work a hostile document can make the core do before it is refused is bounded by constants.

The signature (step 4) is checked under the signer's own key before the chain (step 6), so the key is the
document's choice: keys outside what Azure signs with are refused before the RSA operation (the generated
cases ``key-*``; ``key-rsa-huge-exponent-bad-signature`` proves the order, since checking the signature
first would answer signature_invalid). A failing chain is built again at a few other instants to tell
expired from untrusted; these tests count the path-building runs. ``benchmarks/bench_verify.py`` prints
what each costs.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import pytest
from cryptography import x509

from attest_service.errors import VerificationError
from attest_service.trust import TrustStore
from attest_service.verify import CloudTrust, DocumentVerifier, chain, decode, signer_certificate

from .conftest import case_input, case_instant, case_policy, load_index

INDEX = load_index()


@pytest.fixture
def path_runs(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """The instants at which the core built a path, recorded around the real path builder."""
    runs: list[datetime] = []
    real: Callable[[x509.Certificate, CloudTrust, datetime], list[x509.Certificate]] = chain._attempt

    def counted(signer: x509.Certificate, trust: CloudTrust, instant: datetime) -> list[x509.Certificate]:
        runs.append(instant)
        return real(signer, trust, instant)

    monkeypatch.setattr(chain, "_attempt", counted)
    return runs


def _code(name: str, trust: TrustStore) -> str:
    case = INDEX[name]
    with pytest.raises(VerificationError) as caught:
        DocumentVerifier(trust).verify(decode(case_input(case)), policy=case_policy(case),
                                       now=case_instant(case))
    return caught.value.code


def test_an_issuer_no_pin_names_costs_one_path_building_run(test_trust: TrustStore, path_runs: list[datetime]) -> None:
    # Probing other instants cannot find a path when no pin even carries the issuer's name.
    assert _code("intermediate-not-pinned", test_trust) == "untrusted_chain"
    assert len(path_runs) == 1


@pytest.mark.parametrize(("name", "code"), [("attack-lookalike-chain", "untrusted_chain"),
                                            ("leaf-eku-code-signing", "untrusted_chain"),
                                            ("leaf-expired", "certificate_expired"),
                                            ("intermediate-expired", "certificate_expired")])
def test_a_failing_chain_is_retried_a_bounded_number_of_times(name: str, code: str, test_trust: TrustStore,
                                                               path_runs: list[datetime]) -> None:
    # The attacker's look-alike CAs copy the pinned names, so the probes do run for it: never more than the bound.
    assert _code(name, test_trust) == code
    assert 1 < len(path_runs) <= 1 + chain.MAX_TIME_PROBES
    assert len(set(path_runs)) == len(path_runs)


def test_probe_instants_lie_inside_the_signer_validity_and_skip_the_failed_instant() -> None:
    der = decode(case_input(INDEX["leaf-expired"]))
    signer = signer_certificate(der)
    start, end = signer.not_valid_before_utc, signer.not_valid_after_utc
    probes = chain.probe_instants(signer, start + (end - start) / 2)
    assert 0 < len(probes) <= chain.MAX_TIME_PROBES
    assert all(start <= probe <= end for probe in probes)
    assert start + (end - start) / 2 not in probes


@pytest.mark.parametrize("name", ["key-rsa-1024", "key-rsa-8192", "key-rsa-e3", "key-rsa-huge-exponent",
                                  "key-rsa-huge-exponent-bad-signature", "key-ec-p521"])
def test_a_key_outside_what_azure_uses_is_refused_before_the_chain(name: str, test_trust: TrustStore,
                                                                   path_runs: list[datetime]) -> None:
    assert _code(name, test_trust) == "unsupported_document"
    assert path_runs == []
