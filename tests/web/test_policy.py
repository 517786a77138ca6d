"""The access policy: parsing refusals, each allow-list rule, and how keys and anonymous callers combine."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from attest_service.callers.policy import ANONYMOUS, AccessPolicy, load_policy, parse_policy
from attest_service.errors import ConfigurationError
from tests.web.conftest import API_KEYS_ENV, SUBSCRIPTION, AppFactory, GeneratedPki, bearer

CLIENTS = frozenset({"license-server", "billing"})


@pytest.mark.parametrize(("text", "fragment"), [
    ('[clients.license-server]\nsubscriptions = []\n', "empty allow-list"),
    ('[clients.license-server]\nplans = []\n', "empty allow-list"),
    ('[clients.license-server]\nclouds = ["mars"]\n', "unknown cloud"),
    ('[clients.license-server]\nskus = [1]\n', "list of strings"),
    ('[clients.license-server]\nplans = [{publisher = "a", product = "b"}]\n', "exactly publisher"),
    ('[clients.license-server]\nrequire_challenge = "yes"\n', "true or false"),
    ('[clients.license-server]\nsubscription = ["x"]\n', "unknown keys"),
    ('[clients.stranger]\nclouds = ["public"]\n', "has no key"),
    ('[anonymous]\nclouds = ["public"]\n', "require_challenge = true"),
    ('[anonymous]\nrequire_challenge = false\n', "require_challenge = true"),
    ('[other]\n', "unknown top-level"),
    ("not toml = = =", "not valid TOML"),
])
def test_invalid_policies_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        parse_policy(text, api_clients=CLIENTS)


def test_policy_admitting_nobody_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="nobody"):
        parse_policy("", api_clients=frozenset())


def test_defaults_without_a_file() -> None:
    # Keyless callers without a policy file need service-issued challenges; the open mode is asked for.
    assert load_policy(None, api_clients=frozenset()) == AccessPolicy.challenges_only()
    assert load_policy(None, api_clients=frozenset(), open_access=True) == AccessPolicy.open()
    keyed = load_policy(None, api_clients=CLIENTS)
    assert keyed.anonymous is None
    assert keyed.for_client("billing").require_challenge is False


def test_anonymous_section() -> None:
    policy = parse_policy('[anonymous]\nrequire_challenge = true\nclouds = ["public"]\n', api_clients=frozenset())
    assert policy.anonymous is not None
    assert policy.anonymous.client_id == ANONYMOUS
    assert policy.anonymous.clouds == frozenset({"public"})


RULES = [
    ('clouds = ["usgov"]', "cloud public is not in the allow-list of client license-server"),
    ('subscriptions = ["other"]', f"subscription {SUBSCRIPTION} is not in the allow-list"),
    ('plans = [{publisher = "contoso", product = "widget", name = "silver"}]', "plan contoso/widget/gold"),
    ('skus = [""]', "sku '20_04-lts-gen2'"),
    ('license_types = ["Windows_Server"]', "license type ''"),
]


@pytest.mark.parametrize(("rule", "message"), RULES)
def test_each_rule_denies_over_http(rule: str, message: str, make_client: AppFactory, test_pki: GeneratedPki) -> None:
    client = make_client(ATTEST_API_KEYS=API_KEYS_ENV, policy=f"[clients.license-server]\n{rule}\n")
    response = client.post("/v1/verify", json={"signature": test_pki.signature()}, headers=bearer("license-server"))
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "policy_denied"
    assert message in response.get_json()["error"]["message"]


def test_matching_allow_lists_admit(make_client: AppFactory, test_pki: GeneratedPki) -> None:
    policy = (
        "[clients.license-server]\n"
        'clouds = ["public"]\n'
        f'subscriptions = ["{SUBSCRIPTION}"]\n'
        'plans = [{publisher = "contoso", product = "widget", name = "gold"}]\n'
        'skus = ["", "20_04-lts-gen2"]\n'
        'license_types = ["", "Windows_Server"]\n'
    )
    client = make_client(ATTEST_API_KEYS=API_KEYS_ENV, policy=policy)
    response = client.post("/v1/verify", json={"signature": test_pki.signature()}, headers=bearer("license-server"))
    assert response.status_code == 200, response.get_data(as_text=True)


def test_client_requiring_challenges(make_client: AppFactory, test_pki: GeneratedPki) -> None:
    client: FlaskClient = make_client(ATTEST_API_KEYS=API_KEYS_ENV,
                                      policy="[clients.license-server]\nrequire_challenge = true\n")
    headers = bearer("license-server")
    own = client.post("/v1/verify", json={"signature": test_pki.signature(nonce="own-nonce")}, headers=headers)
    assert own.get_json()["error"]["code"] == "nonce_unknown"
    # Another client's challenge is not this client's.
    foreign = client.post("/v1/challenges", headers=bearer("billing")).get_json()["nonce"]
    response = client.post("/v1/verify", json={"signature": test_pki.signature(nonce=foreign)}, headers=headers)
    assert response.get_json()["error"]["code"] == "nonce_unknown"
    nonce = client.post("/v1/challenges", headers=headers).get_json()["nonce"]
    response = client.post("/v1/verify", json={"signature": test_pki.signature(nonce=nonce), "nonce": nonce},
                           headers=headers)
    assert response.status_code == 200
    assert response.get_json()["nonce"]["challenge"] is True


def test_keys_without_anonymous_section_refuse_keyless(make_client: AppFactory) -> None:
    client = make_client(ATTEST_API_KEYS=API_KEYS_ENV, policy='[clients.billing]\nclouds = ["public"]\n')
    assert client.post("/v1/challenges").status_code == 401


def test_keys_with_anonymous_section_admit_keyless_with_challenge(make_client: AppFactory,
                                                                  test_pki: GeneratedPki) -> None:
    client = make_client(ATTEST_API_KEYS=API_KEYS_ENV, policy="[anonymous]\nrequire_challenge = true\n")
    nonce = client.post("/v1/challenges").get_json()["nonce"]
    assert client.post("/v1/verify", json={"signature": test_pki.signature(nonce=nonce)}).status_code == 200
    # A wrong key is refused, never downgraded to anonymous.
    assert client.post("/v1/challenges", headers={"Authorization": "Bearer nope"}).status_code == 401
