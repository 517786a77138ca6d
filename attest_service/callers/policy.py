"""Who may call the service and which genuine documents each caller may have accepted.

The policy file (``ATTEST_POLICY_FILE``, TOML; README, "Callers and their allow-lists") is read into
frozen values at start-up, and again whenever it changes (:mod:`attest_service.callers.reloading`): an
:class:`AccessPolicy` of one :class:`CallerPolicy` per caller. Checks run
after the document verified and before its nonce is claimed, so a denied document keeps its nonce.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

from attest_service.clouds import CLOUDS
from attest_service.errors import ConfigurationError, PolicyDenied
from attest_service.files import read_bounded
from attest_service.verify import VerifiedDocument

#: The client id under which keyless callers are recorded in the nonce store. Configured client ids
#: start with a letter or digit (see ``config.parse_api_keys``), so this one cannot collide with them.
ANONYMOUS: Final = "-anonymous"
#: Largest policy file read, in bytes: a policy is a few KiB; the bound protects start-up from a wrong path.
MAX_POLICY_BYTES: Final = 1024 * 1024

_PLAN_FIELDS: Final = ("publisher", "product", "name")
_LIST_FIELDS: Final = ("clouds", "subscriptions", "plans", "skus", "license_types")
_SECTION_KEYS: Final = frozenset({*_LIST_FIELDS, "require_challenge"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A Marketplace plan as IMDS signs it: ``plan.publisher``, ``plan.product``, ``plan.name``."""

    publisher: str
    product: str
    name: str

    def describe(self) -> str:
        """``publisher/product/name``, for messages."""
        return f"{self.publisher}/{self.product}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CallerPolicy:
    """The allow-lists of one caller; ``None`` means the field is not restricted."""

    client_id: str
    clouds: frozenset[str] | None = None
    subscriptions: frozenset[str] | None = None
    plans: frozenset[Plan] | None = None
    skus: frozenset[str] | None = None
    license_types: frozenset[str] | None = None
    require_challenge: bool = False

    def __post_init__(self) -> None:
        # The same rule as the policy file's: an empty allow-list would silently admit nothing, which is never
        # what was meant; None is "not restricted".
        for name in ("clouds", "subscriptions", "plans", "skus", "license_types"):
            value = getattr(self, name)
            if value is not None and not value:
                raise ValueError(f"CallerPolicy({name}=...): an empty allow-list admits nothing; "
                                 f"give None to not restrict {name}")

    @classmethod
    def unrestricted(cls, client_id: str) -> CallerPolicy:
        """A caller without allow-lists that may present its own nonces."""
        return cls(client_id=client_id)

    @property
    def label(self) -> str:
        """How messages name this caller."""
        return "anonymous callers" if self.client_id == ANONYMOUS else f"client {self.client_id}"

    def check(self, document: VerifiedDocument) -> None:
        """Raise :class:`PolicyDenied` naming the first rule ``document`` breaks; return if it passes all."""
        claims = document.claims
        if self.clouds is not None and document.cloud not in self.clouds:
            self._deny(f"cloud {document.cloud}")
        subscription = claims.value_at("subscriptionId")
        if self.subscriptions is not None and subscription not in self.subscriptions:
            # Classic documents carry no subscriptionId: a restricted caller cannot admit them.
            self._deny("a document without subscriptionId" if subscription is None else f"subscription {subscription}")
        if self.plans is not None:
            plan = Plan(publisher=claims.value_at("plan", "publisher") or "",
                        product=claims.value_at("plan", "product") or "", name=claims.value_at("plan", "name") or "")
            if plan not in self.plans:
                self._deny(f"plan {plan.describe()}")
        sku = claims.value_at("sku")
        if self.skus is not None and sku not in self.skus:
            self._deny("a document without sku" if sku is None else f"sku {sku!r}")
        license_type = claims.value_at("licenseType")
        if self.license_types is not None and license_type not in self.license_types:
            self._deny("a document without licenseType" if license_type is None
                       else f"license type {license_type!r}")

    def _deny(self, what: str) -> None:
        raise PolicyDenied(f"{what} is not in the allow-list of {self.label}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessPolicy:
    """Every caller's policy: the keyed clients and, when configured, anonymous callers."""

    clients: Mapping[str, CallerPolicy] = field(default_factory=lambda: MappingProxyType({}))
    anonymous: CallerPolicy | None = None

    @classmethod
    def open(cls) -> AccessPolicy:
        """Anyone may call, with their own nonces, without allow-lists: only for a loopback or opted-in service."""
        return cls(anonymous=CallerPolicy.unrestricted(ANONYMOUS))

    @classmethod
    def challenges_only(cls) -> AccessPolicy:
        """No keys, no policy file: anyone may call, without allow-lists, presenting service-issued challenges."""
        return cls(anonymous=CallerPolicy(client_id=ANONYMOUS, require_challenge=True))

    def for_client(self, client_id: str) -> CallerPolicy:
        """The policy of an authenticated client; unrestricted when the file has no section for it."""
        return self.clients.get(client_id) or _unrestricted(client_id)


@functools.lru_cache(maxsize=1024)
def _unrestricted(client_id: str) -> CallerPolicy:
    # Asked for on every request of a client the policy file does not name (every client, without a file);
    # the policy is immutable, so one object per client id serves them all.
    return CallerPolicy.unrestricted(client_id)


def _string_list(section: Mapping[str, object], key: str, where: str) -> frozenset[str] | None:
    if key not in section:
        return None
    value = section[key]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigurationError(f"{where}.{key}: expected a list of strings")
    if not value:
        raise ConfigurationError(f"{where}.{key}: an empty allow-list admits nothing; remove the key to not restrict")
    return frozenset(value)


def _plans(section: Mapping[str, object], where: str) -> frozenset[Plan] | None:
    if "plans" not in section:
        return None
    value = section["plans"]
    if not isinstance(value, list):
        raise ConfigurationError(f"{where}.plans: expected a list of {{publisher, product, name}} tables")
    if not value:
        raise ConfigurationError(f"{where}.plans: an empty allow-list admits nothing; remove the key to not restrict")
    plans = []
    for item in value:
        if not isinstance(item, dict) or set(item) != set(_PLAN_FIELDS) or not all(
                isinstance(item[key], str) for key in _PLAN_FIELDS):
            raise ConfigurationError(f"{where}.plans: each plan is a table of exactly publisher, product and name "
                                     "(strings)")
        plans.append(Plan(publisher=item["publisher"], product=item["product"], name=item["name"]))
    return frozenset(plans)


def _caller(client_id: str, section: object, where: str) -> CallerPolicy:
    if not isinstance(section, dict):
        raise ConfigurationError(f"{where}: expected a table")
    unknown = set(section) - _SECTION_KEYS
    if unknown:
        raise ConfigurationError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    require_challenge = section.get("require_challenge", False)
    if not isinstance(require_challenge, bool):
        raise ConfigurationError(f"{where}.require_challenge: expected true or false")
    clouds = _string_list(section, "clouds", where)
    if clouds is not None and not clouds <= set(CLOUDS):
        raise ConfigurationError(f"{where}.clouds: unknown cloud(s) {', '.join(sorted(clouds - set(CLOUDS)))}")
    return CallerPolicy(
        client_id=client_id,
        clouds=clouds,
        subscriptions=_string_list(section, "subscriptions", where),
        plans=_plans(section, where),
        skus=_string_list(section, "skus", where),
        license_types=_string_list(section, "license_types", where),
        require_challenge=require_challenge,
    )


def parse_policy(text: str, *, api_clients: frozenset[str], origin: str = "policy") -> AccessPolicy:
    """Parse policy TOML; ``api_clients`` are the client ids that have keys.

    A policy file::

        [clients.license-server]            # a client id of ATTEST_API_KEYS
        clouds = ["public"]
        subscriptions = ["8a205152-..."]
        plans = [{publisher = "contoso", product = "widget", name = "gold"}]
        skus = ["", "20_04-lts-gen2"]        # "" admits custom images, whose sku is empty
        license_types = ["", "Windows_Server"]
        require_challenge = true

        [anonymous]                          # callers without a key; only when explicitly configured
        require_challenge = true             # mandatory: anonymous callers must present a challenge
        clouds = ["public"]

    An absent list means "no restriction on that field"; an empty list is a configuration error, never
    "allow everything". A client with a key but no section is unrestricted and may use its own nonces.

    Raises :class:`ConfigurationError` for invalid TOML, unknown keys, empty allow-lists, a section for a
    client without a key, anonymous callers allowed without challenges, or a policy that admits nobody.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{origin}: not valid TOML ({exc})") from exc
    unknown = set(document) - {"clients", "anonymous"}
    if unknown:
        raise ConfigurationError(f"{origin}: unknown top-level keys {', '.join(sorted(unknown))}")
    sections = document.get("clients", {})
    if not isinstance(sections, dict):
        raise ConfigurationError(f"{origin}: [clients] must be a table of client tables")
    clients: dict[str, CallerPolicy] = {}
    for client_id, section in sections.items():
        if client_id not in api_clients:
            raise ConfigurationError(f"{origin}: [clients.{client_id}] has no key in ATTEST_API_KEYS")
        clients[client_id] = _caller(client_id, section, f"{origin}: clients.{client_id}")
    anonymous = None
    if "anonymous" in document:
        anonymous = _caller(ANONYMOUS, document["anonymous"], f"{origin}: anonymous")
        if not anonymous.require_challenge:
            # Without a challenge, anyone could replay any VM's document the first time it is seen.
            raise ConfigurationError(f"{origin}: [anonymous] must set require_challenge = true")
    if anonymous is None and not api_clients:
        raise ConfigurationError(f"{origin}: no [anonymous] section and no ATTEST_API_KEYS: nobody could call")
    return AccessPolicy(clients=MappingProxyType(clients), anonymous=anonymous)


def load_policy(path: Path | None, *, api_clients: frozenset[str], open_access: bool = False) -> AccessPolicy:
    """The access policy of the service.

    Without a file: keyed clients only, unrestricted, when keys are configured; otherwise anonymous callers
    with service-issued challenges (:meth:`AccessPolicy.challenges_only`), or with their own nonces too when
    ``open_access`` is set (:meth:`AccessPolicy.open`). ``open_access`` with keys or a file is a
    :class:`ConfigurationError`, as is an unreadable or invalid file.

    Why challenges by default: accepting keyless callers' own nonces would let anyone replay a VM's captured
    document the first time it is seen. The fully open mode is for a service that only its own machine can
    reach, or that the operator opened explicitly (``ATTEST_ALLOW_OPEN``).
    """
    if open_access and (path is not None or api_clients):
        raise ConfigurationError("the open mode (anonymous callers with their own nonces) applies only without "
                                 "ATTEST_API_KEYS and without ATTEST_POLICY_FILE")
    if path is None:
        if api_clients:
            return AccessPolicy()
        return AccessPolicy.open() if open_access else AccessPolicy.challenges_only()
    data = read_bounded(path, MAX_POLICY_BYTES, what="ATTEST_POLICY_FILE")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"ATTEST_POLICY_FILE: {path} is not UTF-8") from exc
    return parse_policy(text, api_clients=api_clients, origin=f"ATTEST_POLICY_FILE {path}")
