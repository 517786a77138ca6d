"""CRLs of the trust directory: ``<cloud>/crls/*.crl`` (DER or PEM), each checked against the pins before use.

A CRL counts only when its signature verifies under a pinned CA (root or intermediate) of the same cloud that
it names as issuer, and that CA may sign CRLs (keyUsage cRLSign, when it has a keyUsage). Only complete CRLs
are used: a delta CRL, an indirect CRL, one limited to some revocation reasons or to attribute certificates,
one without ``nextUpdate`` or one with a critical extension not understood here is not. Any file of the folder
that is not used (malformed, forged, of a CA not pinned in that cloud, of another kind, not named ``*.crl``)
is named with the reason in :attr:`CloudTrust.crl_problems`: ``certs check`` fails on it and the reload logs
it, but it never fails the load of the pins: a CRL can only narrow the trust, and the pins must keep working.

Loading reads each CRL's entries once into a ``frozenset`` of serial numbers (the lookup of
:mod:`attest_service.verify.revocation`). A large issuing-CA CRL costs a fraction of a second to parse and
check, so results are remembered per file content and issuing CA (:data:`MAX_REMEMBERED`): a reload that
changes a pin but not the CRLs, and every worker forked after the master loaded them, reuse the sets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from attest_service.errors import ConfigurationError
from attest_service.files import read_bounded
from attest_service.verify import CloudTrust, PinnedCertificate, TrustStore, common_name
from attest_service.verify.revocation import RevocationList, distribution_point_names, issuer_key

#: The folder of a cloud that holds its CRLs.
CRL_FOLDER: Final = "crls"
#: The suffix of a CRL file; anything else in the folder is reported and not read.
CRL_SUFFIX: Final = ".crl"
#: Largest CRL read or fetched, in bytes. Issuing CAs with short-lived leaves publish CRLs of several MB
#: (a 100,000-entry CRL is about 5 MB in DER).
MAX_CRL_BYTES: Final = 32 * 1024 * 1024
#: ``certs check`` warns when a CRL in use is past its nextUpdate or this close to it.
STALE_WARNING: Final = timedelta(days=1)
#: Parsed CRLs remembered by content and issuing CA (a few per issuing CA in use).
MAX_REMEMBERED: Final = 64

#: CRL extensions understood here; a critical one outside this set makes the CRL unusable (RFC 5280 5.2).
_UNDERSTOOD: Final = frozenset({x509.CRLNumber.oid, x509.AuthorityKeyIdentifier.oid,
                                x509.IssuingDistributionPoint.oid, x509.IssuerAlternativeName.oid,
                                x509.DeltaCRLIndicator.oid, x509.FreshestCRL.oid})

_remembered: OrderedDict[tuple[bytes, bytes], _Parsed] = OrderedDict()
_remembered_lock = threading.Lock()


class CrlRefused(Exception):
    """A CRL file that is not used; ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What a CRL's content gives, independent of where the file lies."""

    this_update: datetime
    next_update: datetime
    serials: frozenset[int]
    number: int | None
    covers_end_entities: bool
    covers_cas: bool
    distribution_points: frozenset[str] | None


def parse_crl(data: bytes, *, origin: str) -> x509.CertificateRevocationList:
    """One CRL from PEM or DER ``data``; raises CrlRefused naming ``origin`` when it is not one."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CrlRefused(f"{origin}: not a CRL in DER or PEM ({exc})") from exc


def _scope(crl: x509.CertificateRevocationList) -> tuple[bool, bool, frozenset[str] | None, int | None]:
    """``(covers end entities, covers CAs, distribution points, CRL number)``; CrlRefused when not usable."""
    try:
        extensions = list(crl.extensions)
    except (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CrlRefused(f"its extensions cannot be read ({exc})") from exc
    for extension in extensions:
        if extension.critical and extension.oid not in _UNDERSTOOD:
            raise CrlRefused(f"it has a critical extension not understood here ({extension.oid.dotted_string})")
    covers_end_entities = covers_cas = True
    points: frozenset[str] | None = None
    number: int | None = None
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.DeltaCRLIndicator):
            raise CrlRefused("it is a delta CRL; only complete CRLs are used")
        if isinstance(value, x509.CRLNumber):
            number = value.crl_number
        if isinstance(value, x509.IssuingDistributionPoint):
            if value.indirect_crl:
                raise CrlRefused("it is an indirect CRL; only CRLs of the CA that signed them are used")
            if value.only_some_reasons is not None:
                raise CrlRefused("it lists only some revocation reasons; only complete CRLs are used")
            if value.only_contains_attribute_certs:
                raise CrlRefused("it covers attribute certificates only")
            covers_end_entities = not value.only_contains_ca_certs
            covers_cas = not value.only_contains_user_certs
            if value.full_name is not None:
                points = distribution_point_names([x509.DistributionPoint(value.full_name, None, None, None)])
            elif value.relative_name is not None:
                raise CrlRefused("its issuing distribution point is a relative name, which is not supported")
    return covers_end_entities, covers_cas, points, number


def _serials(crl: x509.CertificateRevocationList) -> frozenset[int]:
    serials = set()
    for entry in crl:
        serials.add(entry.serial_number)
    return frozenset(serials)


def _may_sign_crls(ca: x509.Certificate) -> bool:
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    except (ValueError, x509.DuplicateExtension):
        return False
    return usage.crl_sign


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False


def _parse_content(crl: x509.CertificateRevocationList) -> _Parsed:
    covers_end_entities, covers_cas, points, number = _scope(crl)
    this_update = crl.last_update_utc
    next_update = crl.next_update_utc
    if next_update is None:
        raise CrlRefused("it has no nextUpdate, so it cannot be told when it stops being current")
    if next_update < this_update:
        raise CrlRefused(f"its nextUpdate {next_update.isoformat()} is before its thisUpdate")
    try:
        serials = _serials(crl)
    except (ValueError, TypeError) as exc:
        raise CrlRefused(f"its entries cannot be read ({exc})") from exc
    return _Parsed(this_update=this_update, next_update=next_update, serials=serials, number=number,
                   covers_end_entities=covers_end_entities, covers_cas=covers_cas, distribution_points=points)


#: What cryptography raises for a CRL it cannot make sense of, where it decodes lazily (a version it does not
#: know, a field of a type it does not expect; where warnings are errors, its parse warnings).
_FOREIGN_ERRORS: Final = (ValueError, TypeError, KeyError, IndexError, OverflowError, x509.InvalidVersion,
                          x509.DuplicateExtension, x509.UnsupportedGeneralNameType, UnsupportedAlgorithm, UserWarning)


def accept_crl(data: bytes, trust: CloudTrust, *, source: str) -> RevocationList:
    """The CRL of ``data`` as used for ``trust``'s cloud; raises CrlRefused saying why it is not used.

    ``source`` names the file in messages and in the result. Nothing else escapes, whatever the bytes.
    """
    try:
        return _accept_crl(data, trust, source=source)
    except _FOREIGN_ERRORS as exc:
        raise CrlRefused(f"{source}: not a usable CRL ({type(exc).__name__}: {exc})") from exc


def _accept_crl(data: bytes, trust: CloudTrust, *, source: str) -> RevocationList:
    crl = parse_crl(data, origin=source)
    cloud = trust.profile.name
    try:
        issuer_name = crl.issuer
        issuer_label = issuer_name.rfc4514_string()
    except (ValueError, TypeError) as exc:
        raise CrlRefused(f"{source}: its issuer name cannot be read ({exc})") from exc
    named = [pin for pin in (*trust.roots, *trust.intermediates) if pin.certificate.subject == issuer_name]
    if not named:
        raise CrlRefused(f"{source}: its issuer {issuer_label[:200]!r} is not a pinned CA of {cloud}")
    digest = hashlib.sha256(data).digest()
    try:
        found = _remembered_issuer(digest, named) or _verified_issuer(crl, digest, named)
    except CrlRefused as exc:
        raise CrlRefused(f"{source}: {exc.message}") from exc
    if found is None:
        raise CrlRefused(f"{source}: its signature does not verify under the pinned {cloud} CA "
                         f"{common_name(issuer_name)!r} it names (forged or damaged)")
    signer, key, parsed = found
    return RevocationList(cloud=cloud, issuer=key, issuer_name=common_name(signer.certificate.subject),
                          this_update=parsed.this_update, next_update=parsed.next_update, serials=parsed.serials,
                          source=source, number=parsed.number, covers_end_entities=parsed.covers_end_entities,
                          covers_cas=parsed.covers_cas, distribution_points=parsed.distribution_points)


_Found = tuple[PinnedCertificate, bytes, _Parsed]


def _remembered_issuer(digest: bytes, named: Iterable[PinnedCertificate]) -> _Found | None:
    """A pin under whose key these very bytes verified before, with what they gave then."""
    with _remembered_lock:
        for pin in named:
            key = issuer_key(pin.certificate)
            parsed = _remembered.get((digest, key))
            if parsed is not None and _may_sign_crls(pin.certificate):
                _remembered.move_to_end((digest, key))
                return pin, key, parsed
    return None


def _verified_issuer(crl: x509.CertificateRevocationList, digest: bytes,
                     named: Iterable[PinnedCertificate]) -> _Found | None:
    # Pins sharing a name may differ in key (a re-keyed CA): the one whose key verifies is the issuer.
    for pin in named:
        if _signed_by(crl, pin.certificate):
            if not _may_sign_crls(pin.certificate):
                raise CrlRefused(f"its issuer {pin.subject_cn!r} may not sign CRLs (its keyUsage lacks cRLSign)")
            key = issuer_key(pin.certificate)
            parsed = _parse_content(crl)
            with _remembered_lock:
                _remembered[(digest, key)] = parsed
                while len(_remembered) > MAX_REMEMBERED:
                    _remembered.popitem(last=False)
            return pin, key, parsed
    return None


def load_crls(trust: CloudTrust, directory: Path, base: Path) -> CloudTrust:
    """``trust`` with the usable CRLs of ``directory`` (its ``crls/`` folder) and a problem for each other file.

    ``base`` is the trust directory (sources are named relative to it). Never raises for a file's content;
    a folder that cannot be listed raises ConfigurationError like any unreadable part of the directory.
    """
    if not directory.is_dir():
        return trust
    crls: list[RevocationList] = []
    problems: list[str] = []
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise ConfigurationError(f"{directory}: cannot read ({exc.strerror})") from exc
    for path in entries:
        source = path.relative_to(base).as_posix()
        if path.name.startswith("."):
            continue
        if path.name in (SOURCES_LIST, WANTED_LIST):
            continue
        if path.suffix != CRL_SUFFIX:
            problems.append(f"{source}: not used: only *{CRL_SUFFIX} files (DER or PEM) are CRLs")
            continue
        try:
            data = read_bounded(path, MAX_CRL_BYTES, what="CRL")
            crls.append(accept_crl(data, trust, source=source))
        except ConfigurationError as exc:
            problems.append(f"{source}: not used: {exc.message}")
        except CrlRefused as exc:
            problems.append(f"{source}: not used: {exc.message.removeprefix(source + ': ')}")
    return dataclasses.replace(trust, crls=tuple(crls), crl_problems=tuple(problems))


#: File in ``<cloud>/crls/`` recording the URL each fetched CRL came from (``FILE  URL`` per line), so that
#: a refresh fetches the same ones again. Written by ``certs crls fetch``; not a CRL, not reported.
SOURCES_LIST: Final = "sources.txt"
#: File in ``<cloud>/crls/`` listing CRL URLs the service wants fetched (``URL  # why`` per line): those of
#: signers it verified without a current CRL (:mod:`attest_service.trust.crl_wanted`). Not a CRL, not reported.
WANTED_LIST: Final = "wanted.txt"


@dataclass(frozen=True, slots=True, kw_only=True)
class CrlStatus:
    """One CRL in use, as ``certs check`` and ``certs crls list`` report it."""

    cloud: str
    issuer: str
    source: str
    this_update: datetime
    next_update: datetime
    entries: int
    number: int | None

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {"cloud": self.cloud, "issuer": self.issuer, "file": self.source,
                "thisUpdate": self.this_update.isoformat(), "nextUpdate": self.next_update.isoformat(),
                "entries": self.entries, "crlNumber": self.number}


def crl_statuses(trust: TrustStore) -> list[CrlStatus]:
    """Every CRL in use, by cloud and file."""
    return [CrlStatus(cloud=crl.cloud, issuer=crl.issuer_name, source=crl.source, this_update=crl.this_update,
                      next_update=crl.next_update, entries=len(crl.serials), number=crl.number)
            for cloud in trust.clouds.values() for crl in cloud.crls]


@dataclass(frozen=True, slots=True, kw_only=True)
class CrlCheck:
    """What ``certs check`` says of the CRLs: problems (it fails) and warnings (it passes)."""

    problems: tuple[str, ...]
    warnings: tuple[str, ...]


def check_crls(trust: TrustStore, *, now: datetime) -> CrlCheck:
    """Files of ``crls/`` not used (problems) and CRLs in use past, near or before their window (warnings)."""
    problems = tuple(problem for cloud in trust.clouds.values() for problem in cloud.crl_problems)
    warnings: list[str] = []
    for status in crl_statuses(trust):
        if status.next_update < now:
            warnings.append(f"{status.source}: the CRL of {status.issuer} is past its nextUpdate "
                            f"{status.next_update.isoformat()}: not current, fetch a newer one")
        elif status.next_update - now <= STALE_WARNING:
            warnings.append(f"{status.source}: the CRL of {status.issuer} reaches its nextUpdate "
                            f"{status.next_update.isoformat()} within a day: fetch a newer one")
        elif status.this_update > now:
            warnings.append(f"{status.source}: the CRL of {status.issuer} is current only from "
                            f"{status.this_update.isoformat()}")
    return CrlCheck(problems=problems, warnings=tuple(warnings))
