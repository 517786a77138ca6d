"""The chart opens HTTP(S) egress exactly when a fetch of the service needs it, rendered by the real helm.

The service fetches from the internet in three cases only: the CAs pinned by fingerprint (Azure China's, on by
default), the AIA fallback and the CRLs fetched beside the service. The NetworkPolicy must let those fetches out
(else they fail silently in the background) and must not open anything when none of them is on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from attest_service.settings import Settings
from attest_service.trust import load_trust

from .common import REPO_ROOT, HelmFailed, by_kind, one

Render = Callable[..., list[dict[str, Any]]]

BUNDLED = REPO_ROOT / "pinned_certs"
#: The ports the service's fetches use (http:// and https:// URLs of the allow-lists).
FETCH_PORTS = [{"port": 80, "protocol": "TCP"}, {"port": 443, "protocol": "TCP"}]


def _pins(*, with_fingerprints: bool) -> dict[str, dict[str, dict[str, str]]]:
    """The repository's pinned_certs/ as the chart's pinnedCerts value, with or without fingerprints.txt."""
    values: dict[str, dict[str, dict[str, str]]] = {}
    names = {"certifi.txt", "fingerprints.txt"} if with_fingerprints else {"certifi.txt"}
    for path in sorted(BUNDLED.glob("*/*/*")):
        if path.suffix == ".pem" or path.name in names:
            values.setdefault(path.parent.parent.name, {}).setdefault(path.parent.name, {})[path.name] = (
                path.read_text(encoding="ascii"))
    return values


def _settings_data(manifests: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = next(m for m in by_kind(manifests, "ConfigMap")
                                if m["metadata"]["name"].endswith("-settings"))["data"]
    return data


def _fetch_rules(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The egress rules of the NetworkPolicy that reach TCP 80 or 443."""
    egress = one(manifests, "NetworkPolicy")["spec"]["egress"]
    return [rule for rule in egress if any(p.get("port") in (80, 443) for p in rule.get("ports", []))]


def test_the_default_install_fetches_chinas_pinned_cas_and_may_reach_public_addresses_only(render: Render) -> None:
    manifests = render()
    assert _settings_data(manifests)["ATTEST_FINGERPRINT_FETCH"] == "1"
    assert Settings.from_env(_settings_data(manifests)).fingerprint_fetch is True
    # The bundled pins name China's issuing CAs by fingerprint, so the fetch needs its way out.
    [rule] = _fetch_rules(manifests)
    assert rule["ports"] == FETCH_PORTS
    blocks = [peer["ipBlock"] for peer in rule["to"]]
    assert [block["cidr"] for block in blocks] == ["0.0.0.0/0", "::/0"]
    # What the API server's validation of an ipBlock demands: each except entry strictly inside its cidr.
    for block in blocks:
        whole = ipaddress.ip_network(block["cidr"])
        for cidr in block["except"]:
            part = ipaddress.ip_network(cidr)
            assert part.version == whole.version, cidr
            assert part.subnet_of(whole), cidr  # type: ignore[arg-type]
            assert part != whole, cidr
    excluded = [ipaddress.ip_network(cidr) for block in blocks for cidr in block["except"]]
    # No private range, loopback, IMDS's link-local address or shared (CGNAT) space is reachable through it; nor
    # Azure's host endpoint (WireServer and the host agent plugin, a public address on port 80, which hands a VM
    # its provisioning and extension configuration: a pod that can open it can read what only the node should).
    for address in ("10.1.2.3", "172.20.0.1", "192.168.1.1", "127.0.0.1", "169.254.169.254", "100.64.0.1",
                    "168.63.129.16", "fd00::1", "fe80::1", "::1"):
        assert any(ipaddress.ip_address(address) in network for network in excluded), address
    # DigiCert's China repository (a public address) stays reachable.
    assert not any(ipaddress.ip_address("203.0.113.7") in network for network in excluded)


def test_no_fetch_no_egress_beyond_name_resolution(render: Render) -> None:
    manifests = render(values={"settings": {"fingerprintFetch": False}})
    assert _settings_data(manifests)["ATTEST_FINGERPRINT_FETCH"] == "0"
    assert Settings.from_env(_settings_data(manifests)).fingerprint_fetch is False
    assert one(manifests, "NetworkPolicy")["spec"]["egress"] == [
        {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]


@pytest.mark.parametrize(("settings", "opened"), [
    ({"fingerprintFetch": False, "aiaFetch": True}, True),
    ({"fingerprintFetch": False, "crlRefreshSeconds": 3600}, True),
    ({"fingerprintFetch": False, "aiaFetch": False, "crlRefreshSeconds": 0}, False),
], ids=["aia fallback", "crl refresh", "nothing"])
def test_each_fetch_opens_the_egress_by_itself(render: Render, settings: dict[str, Any], opened: bool) -> None:
    rules = _fetch_rules(render(values={"settings": settings}))
    assert bool(rules) is opened
    assert all(rule["ports"] == FETCH_PORTS for rule in rules)


def test_pins_from_values_open_the_egress_only_when_they_pin_by_fingerprint(render: Render,
                                                                            tmp_path: Path) -> None:
    with_china = _pins(with_fingerprints=True)
    assert "fingerprints.txt" in with_china["china"]["intermediates"]
    manifests = render(values={"pinnedCerts": with_china})
    assert len(_fetch_rules(manifests)) == 1
    # The mounted fingerprints.txt is what the service loads: China's pins by fingerprint, as bundled.
    configmap = next(m for m in by_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-pinned-certs"))
    for key, text in configmap["data"].items():
        cloud, role, name = key.split(".", 2)
        (tmp_path / cloud / role).mkdir(parents=True, exist_ok=True)
        (tmp_path / cloud / role / name).write_text(text, encoding="ascii")
    assert (load_trust(tmp_path).for_cloud("china").fingerprint_pins
            == load_trust(BUNDLED).for_cloud("china").fingerprint_pins != ())

    # No fingerprint pin, or one holding comments only: nothing to fetch, no egress.
    assert _fetch_rules(render(values={"pinnedCerts": _pins(with_fingerprints=False)})) == []
    comments_only = _pins(with_fingerprints=False)
    comments_only["china"]["intermediates"] = {"fingerprints.txt": "# none yet\n\n"}
    assert _fetch_rules(render(values={"pinnedCerts": comments_only})) == []


def test_fetch_to_narrows_the_destination(render: Render) -> None:
    proxy = [{"ipBlock": {"cidr": "203.0.113.0/28"}}]
    [rule] = _fetch_rules(render(values={"networkPolicy": {"fetchTo": proxy}}))
    assert rule == {"ports": FETCH_PORTS, "to": proxy}
    # Empty: any destination on those ports (an operator's explicit choice).
    [rule] = _fetch_rules(render(values={"networkPolicy": {"fetchTo": []}}))
    assert rule == {"ports": FETCH_PORTS}
    # Disabled NetworkPolicy: nothing rendered at all.
    assert not by_kind(render(values={"networkPolicy": {"enabled": False}}), "NetworkPolicy")


@pytest.mark.parametrize("values", [
    {"settings": {"fingerprintFetch": "yes"}},
    {"networkPolicy": {"fetchTo": "0.0.0.0/0"}},
    {"pinnedCerts": {"china": {"intermediates": {"fingerprints.txt": 1}}}},
], ids=["flag as a string", "peers as a string", "fingerprints as a number"])
def test_schema_refuses_fetch_values(render: Render, values: dict[str, Any]) -> None:
    with pytest.raises(HelmFailed, match="values don't meet the specifications of the schema"):
        render(values=values)
