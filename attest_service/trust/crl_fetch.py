"""``certs crls fetch``: download the CRLs that the pinned CAs and given documents' signers name.

Which CRLs: every pinned CA's cRLDistributionPoints (the CRL of the CA above it, so of the roots and of
intermediate CAs), every given document's signer's (the CRL of its issuing CA, which no CA certificate names),
every URL a CRL of the directory was fetched from before (``<cloud>/crls/sources.txt``), so that a refresh
keeps them all current, and those of the signers the service verified without a current CRL
(``<cloud>/crls/wanted.txt``, :mod:`attest_service.trust.crl_wanted`). A certificate naming several URLs
for the same CRL is served by the first that works, and a URL is wanted once.

How, with the AIA fetch's guards (:class:`~attest_service.trust.issuers.CertificateFetcher`): only URLs under
the cloud's allow-list of Microsoft's and DigiCert's CRL hosts (:meth:`CrlPolicy.azure`), only public
addresses (the connection goes to the address checked), one GET, no redirect, a timeout and a size cap fit
for real issuing-CA CRLs (:data:`~attest_service.trust.crls.MAX_CRL_BYTES`); at most :data:`MAX_URLS` URLs
a run. What comes back is kept only when it is a CRL the directory would use
(:func:`~attest_service.trust.crls.accept_crl`: its signature verifies under the pinned CA of that cloud it
names) and is not older than the file it replaces (by CRL number, then thisUpdate); it is written
atomically (a reader sees the old file or the new one), so a running service picks it up with its next
reload. Nothing is ever fetched on the request path: this runs as a command, or beside the service
(``ATTEST_CRL_REFRESH_SECONDS``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Final
from urllib.parse import unquote, urlsplit

from cryptography import x509

from attest_service.errors import AttestError, ConfigurationError
from attest_service.files import read_bounded
from attest_service.trust.crl_wanted import read_wanted
from attest_service.trust.crls import (
    CRL_FOLDER,
    CRL_SUFFIX,
    MAX_CRL_BYTES,
    SOURCES_LIST,
    WANTED_LIST,
    CrlRefused,
    accept_crl,
)
from attest_service.trust.issuers import AddressCheck, AllowRule, CertificateFetcher, FetchRefused, is_public_address
from attest_service.trust.pins.atomic import atomic_write
from attest_service.verify import CloudTrust, TrustStore, cloud_for_signer, signer_certificate
from attest_service.verify.revocation import RevocationList

#: URLs fetched at most per run; the pinned CAs and a few documents name a few dozen.
MAX_URLS: Final = 64
#: Connect and read timeout of one CRL fetch, in seconds (a CRL of several MB, off the request path).
CRL_FETCH_TIMEOUT_SECONDS: Final = 30.0
#: Media type asked for (RFC 5280 4.2.1.13 and RFC 2585).
CRL_MEDIA_TYPE: Final = "application/pkix-crl"


def _rules(*hosts_and_prefixes: tuple[str, str]) -> tuple[AllowRule, ...]:
    return tuple(AllowRule(scheme=scheme, host=host, path_prefix=prefix)
                 for host, prefix in hosts_and_prefixes for scheme in ("http", "https"))


@dataclass(frozen=True, slots=True, kw_only=True)
class CrlPolicy:
    """Where each cloud's CRLs may be fetched from (exact scheme, host, port and path prefix)."""

    allow: Mapping[str, tuple[AllowRule, ...]]

    @classmethod
    def azure(cls) -> CrlPolicy:
        """The CRL hosts Azure's CAs name: Microsoft's PKI repositories and DigiCert's CRL servers."""
        digicert = (("crl3.digicert.com", "/"), ("crl4.digicert.com", "/"))
        microsoft = _rules(("www.microsoft.com", "/pkiops/crl/"), ("crl.microsoft.com", "/pkiops/crl/"),
                           ("crl2.microsoft.com", "/pkiops/crl/"), ("www.microsoft.com", "/pki/mscorp/crl/"),
                           ("crl.microsoft.com", "/pki/mscorp/crl/"), ("mscrl.microsoft.com", "/pki/mscorp/crl/"),
                           *digicert)
        return cls(allow=MappingProxyType({"public": microsoft, "usgov": microsoft,
                                           "china": _rules(("crl.digicert.cn", "/"), *digicert)}))

    def allowed(self, cloud: str, url: str) -> bool:
        """True when ``url`` matches a rule of ``cloud``."""
        return any(rule.matches(url) for rule in self.allow.get(cloud, ()))


def crl_urls(certificate: x509.Certificate) -> tuple[str, ...]:
    """The http(s) URIs of ``certificate``'s cRLDistributionPoints, in order."""
    try:
        points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        return ()
    return tuple(name.value for point in points for name in (point.full_name or ())
                 if isinstance(name, x509.UniformResourceIdentifier)
                 and name.value.lower().startswith(("http://", "https://")))


@dataclass(frozen=True, slots=True)
class Wanted:
    """One CRL to fetch: its cloud, the URLs it may come from (first working one wins), and why it is wanted."""

    cloud: str
    urls: tuple[str, ...]
    reason: str


def read_sources(folder: Path) -> dict[str, str]:
    """``{file name: URL}`` of ``folder/sources.txt``; empty when there is none or it cannot be read."""
    path = folder / SOURCES_LIST
    try:
        text = read_bounded(path, 1024 * 1024, what="CRL sources").decode("utf-8", "replace")
    except ConfigurationError:
        return {}
    sources = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) == 2 and fields[0].endswith(CRL_SUFFIX) and "/" not in fields[0]:
            sources[fields[0]] = fields[1]
    return sources


def wanted_crls(trust: TrustStore, directory: Path, documents: Iterable[bytes] = ()) -> list[Wanted]:
    """What a run fetches: the CRLs the pinned CAs, the signers of ``documents`` (DER) and earlier fetches name.

    A document that cannot be parsed, or whose signer names no cloud's domain, raises ConfigurationError.
    """
    wanted: list[Wanted] = []
    seen: set[tuple[str, str]] = set()

    def want(cloud: str, urls: tuple[str, ...], reason: str) -> None:
        # Alternatives of one CRL (a certificate's URLs) are one item; a URL already wanted adds nothing.
        if urls and not any((cloud, url) in seen for url in urls):
            wanted.append(Wanted(cloud, urls, reason))
            seen.update((cloud, url) for url in urls)

    for number, der in enumerate(documents, start=1):
        try:
            signer = signer_certificate(der)
            cloud = cloud_for_signer(signer).name
        except AttestError as exc:
            raise ConfigurationError(f"document {number}: {exc.message}") from exc
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, x509.InvalidVersion, UserWarning) as exc:
            # The core wraps such errors of its libraries during a verification; here no verification runs.
            raise ConfigurationError(f"document {number}: cannot be read ({type(exc).__name__}: {exc})") from exc
        want(cloud, crl_urls(signer), f"signer of document {number}")
    for name, cloud_trust in trust.clouds.items():
        for pin in (*cloud_trust.intermediates, *cloud_trust.roots):
            want(name, crl_urls(pin.certificate), f"named by {pin.subject_cn}")
        for file, url in sorted(read_sources(directory / name / CRL_FOLDER).items()):
            want(name, (url,), f"fetched before into {file}")
        for urls in read_wanted(directory / name / CRL_FOLDER):
            want(name, urls, f"named by a signer the service verified ({WANTED_LIST})")
    return wanted


def crl_filename(url: str) -> str:
    """The file a CRL fetched from ``url`` is written to: its name in the URL, made plain, and a URL digest."""
    last = PurePosixPath(unquote(urlsplit(url).path)).name
    stem = re.sub(r"[^a-z0-9]+", "-", last.lower().removesuffix(CRL_SUFFIX)).strip("-")[:80] or "crl"
    return f"{stem}-{hashlib.sha256(url.encode()).hexdigest()[:8]}{CRL_SUFFIX}"


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchOutcome:
    """What one URL gave: ``written``, ``unchanged``, ``older``, or why it was refused (the AIA fetch's labels)."""

    cloud: str
    url: str
    result: str
    message: str
    file: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the directory holds this CRL, as new as the URL gave it."""
        return self.result in ("written", "unchanged", "older")

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {"cloud": self.cloud, "url": self.url, "result": self.result, "message": self.message,
                "file": self.file}


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchReport:
    """A run's outcome per URL tried, and the wanted CRLs that no URL gave."""

    outcomes: tuple[FetchOutcome, ...]
    missing: tuple[Wanted, ...]


class CrlFetcher:
    """Fetches the wanted CRLs into a trust directory; ``allow_address`` exists for tests on loopback only."""

    def __init__(self, policy: CrlPolicy | None = None, *, allow_address: AddressCheck = is_public_address,
                 timeout_seconds: float = CRL_FETCH_TIMEOUT_SECONDS, max_bytes: int = MAX_CRL_BYTES) -> None:
        self.policy = policy if policy is not None else CrlPolicy.azure()
        self._fetcher = CertificateFetcher(allow_address=allow_address, timeout_seconds=timeout_seconds,
                                           max_bytes=max_bytes)

    def fetch(self, directory: Path, trust: TrustStore, wanted: Sequence[Wanted]) -> FetchReport:
        """Fetch each of ``wanted`` (at most :data:`MAX_URLS` URLs) into ``directory``; one outcome per URL tried."""
        outcomes: list[FetchOutcome] = []
        missing: list[Wanted] = []
        budget = MAX_URLS
        for item in wanted:
            before = len(outcomes)
            for url in item.urls:
                if budget == 0:
                    outcomes.append(FetchOutcome(cloud=item.cloud, url=url, result="budget",
                                                 message=f"more than {MAX_URLS} URLs in one run: not fetched"))
                    continue
                if not self.policy.allowed(item.cloud, url):
                    outcomes.append(FetchOutcome(cloud=item.cloud, url=url, result="not_allowed",
                                                 message=f"not on the {item.cloud} CRL allow-list ({item.reason})"))
                    continue
                budget -= 1
                outcome = self._fetch_one(directory, trust, item.cloud, url)
                outcomes.append(outcome)
                if outcome.ok:
                    break
            if not any(outcome.ok for outcome in outcomes[before:]):
                missing.append(item)
        return FetchReport(outcomes=tuple(outcomes), missing=tuple(missing))

    def _fetch_one(self, directory: Path, trust: TrustStore, cloud: str, url: str) -> FetchOutcome:
        name = crl_filename(url)
        folder = directory / cloud / CRL_FOLDER
        source = f"{cloud}/{CRL_FOLDER}/{name}"
        try:
            data = self._fetcher.fetch_bytes(url, accept=CRL_MEDIA_TYPE)
        except FetchRefused as exc:
            return FetchOutcome(cloud=cloud, url=url, result=exc.result, message=exc.message)
        cloud_trust = trust.for_cloud(cloud)
        try:
            fetched = accept_crl(data, cloud_trust, source=source)
        except CrlRefused as exc:
            return FetchOutcome(cloud=cloud, url=url, result="invalid", message=exc.message)
        path = folder / name
        try:
            existing_data = read_bounded(path, MAX_CRL_BYTES, what="CRL") if path.is_file() else None
        except ConfigurationError:
            existing_data = None
        if existing_data == data:
            return FetchOutcome(cloud=cloud, url=url, result="unchanged", message="the file holds this CRL",
                                file=source)
        existing = _accepted(existing_data, cloud_trust, source)
        if existing is not None and _order(existing) > _order(fetched):
            return FetchOutcome(cloud=cloud, url=url, result="older", file=source,
                                message=f"the file holds a newer CRL (thisUpdate {existing.this_update.isoformat()})")
        try:
            atomic_write(path, data)
            _record_source(folder, name, url)
        except OSError as exc:
            raise ConfigurationError(f"{path}: cannot write ({exc.strerror})") from exc
        return FetchOutcome(cloud=cloud, url=url, result="written", file=source,
                            message=f"CRL of {fetched.issuer_name}, {len(fetched.serials)} entries, current to "
                                    f"{fetched.next_update.isoformat()}")


def _accepted(data: bytes | None, trust: CloudTrust, source: str) -> RevocationList | None:
    if data is None:
        return None
    try:
        return accept_crl(data, trust, source=source)
    except CrlRefused:
        return None


def _order(crl: RevocationList) -> tuple[int, float]:
    return (crl.number if crl.number is not None else -1, crl.this_update.timestamp())


def _record_source(folder: Path, name: str, url: str) -> None:
    sources = read_sources(folder)
    if sources.get(name) == url:
        return
    sources[name] = url
    lines = ["# CRLs written by certs crls fetch, and the URL each came from (fetched again on refresh)."]
    lines += [f"{file}  {source}" for file, source in sorted(sources.items())]
    atomic_write(folder / SOURCES_LIST, ("\n".join(lines) + "\n").encode())
