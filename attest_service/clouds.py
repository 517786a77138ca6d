"""Azure clouds and the metadata domain each one signs attested documents under.

Source: the Azure Instance Metadata Service documentation, "Attested data", which lists the signing
certificate's name per cloud.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from attest_service.errors import ConfigurationError


@dataclass(frozen=True, slots=True, kw_only=True)
class CloudProfile:
    """One Azure cloud: its name in the API and the DNS domain its signing certificates must fall under."""

    name: str
    domain: str

    @classmethod
    def public(cls) -> CloudProfile:
        """Azure public cloud."""
        return cls(name="public", domain="metadata.azure.com")

    @classmethod
    def usgov(cls) -> CloudProfile:
        """Azure Government (US)."""
        return cls(name="usgov", domain="metadata.azure.us")

    @classmethod
    def china(cls) -> CloudProfile:
        """Azure China (21Vianet)."""
        return cls(name="china", domain="metadata.azure.cn")

    @classmethod
    def germany(cls) -> CloudProfile:
        """Azure Germany (the former sovereign cloud)."""
        return cls(name="germany", domain="metadata.microsoftazure.de")

    def covers(self, dns_name: str) -> bool:
        """True when ``dns_name`` is this cloud's domain or a subdomain of it (ASCII, case-insensitive)."""
        name = dns_name.lower()
        if name.endswith("."):
            # A trailing root label would let "metadata.azure.com." slip past a naive equality check
            # while meaning the same host; it never occurs in Azure's certificates, so refuse it.
            return False
        return name == self.domain or name.endswith("." + self.domain)


CLOUDS: Final[dict[str, CloudProfile]] = {
    profile.name: profile
    for profile in (CloudProfile.public(), CloudProfile.usgov(), CloudProfile.china(), CloudProfile.germany())
}

#: The value of ``--cloud`` / ``"cloud"`` that selects the cloud from the signer's name.
AUTO: Final = "auto"


def cloud_by_name(name: str) -> CloudProfile:
    """Return the profile called ``name``; raise :class:`ConfigurationError` for an unknown cloud."""
    try:
        return CLOUDS[name]
    except KeyError:
        known = ", ".join(sorted(CLOUDS))
        raise ConfigurationError(f"unknown cloud {name!r}; expected one of {known}") from None
