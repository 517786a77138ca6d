"""The VM side of attestation, as a library a vendor embeds: challenge, fetch from IMDS, submit.

:func:`attest` runs the whole exchange:

1. ``POST {service}/v1/challenges`` (with ``Authorization: Bearer <key>`` when a key is given) returns a
   fresh single-use nonce;
2. ``GET {imds}/metadata/attested/document?api-version=...&nonce=<challenge>`` with ``Metadata: true``,
   never through a proxy (IMDS is link-local; a proxy would either fail or, worse, answer for another
   host). Retries follow the IMDS documentation ("Errors and debugging"): 410 means IMDS is still
   starting and may last up to 70 seconds; 429 and 5xx are transient; all are retried with exponential
   backoff;
3. when IMDS hands back a cached document signed over an older nonce, wait and fetch again a bounded
   number of times (the content is decoded only to read the nonce; verification is the service's job);
4. ``POST {service}/v1/verify`` with the document, the challenge and the cloud, and return the verdict.

No redirect of the service is followed: the service never redirects, and following one would send the API
key (and the document) to whatever origin the redirect names. A redirect fails the exchange, naming where it
pointed, so that the operator can give that URL instead if it is the service.

Only the standard library is used, so the module can run in a minimal VM image. Failures raise the
:class:`ClientError` family below; each maps to one exit code of ``attest-service attest``.
"""

from __future__ import annotations

import base64
import binascii
import json
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.client import HTTPMessage
from typing import IO, ClassVar, Final

from asn1crypto import cms

from attest_service.errors import AttestError

#: IMDS's address on every Azure VM (link-local, never routed).
DEFAULT_IMDS_URL: Final = "http://169.254.169.254"

#: The IMDS API version requested by default: the first to sign sku, subscriptionId and licenseType.
DEFAULT_API_VERSION: Final = "2021-02-01"

#: Per-request timeout towards IMDS, in seconds: it answers in milliseconds on the host, and a VM that is
#: not on Azure should learn so quickly rather than hang.
IMDS_TIMEOUT_SECONDS: Final = 5.0

#: Per-request timeout towards the verification service, in seconds.
SERVICE_TIMEOUT_SECONDS: Final = 15.0

#: Largest response read from either peer, in bytes (an attested document is about 4 KiB).
MAX_RESPONSE_BYTES: Final = 1024 * 1024

#: The environment variable ``attest`` reads the API key from when no option gives it.
API_KEY_VARIABLE: Final = "ATTEST_API_KEY"


def check_api_key(key: str) -> str:
    """``key`` when it can travel in an ``Authorization: Bearer`` header; ValueError naming the problem otherwise.

    Visible ASCII only: a line break would end the header (http.client refuses it with an exception), and
    spaces or other characters are not part of a bearer token (RFC 6750 2.1).
    """
    if not key:
        raise ValueError("the API key is empty")
    if not (key.isascii() and key.isprintable()) or " " in key:
        raise ValueError("the API key holds a space, a control character or a non-ASCII character")
    return key


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Follows no redirect: the answer reaches the caller as the 3xx it is (see the module docstring)."""

    def redirect_request(  # noqa: PLR0917 - urllib's signature
            self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,  # noqa: ARG002
            headers: HTTPMessage, newurl: str) -> urllib.request.Request | None:  # noqa: ARG002
        """None: urllib then raises HTTPError with the redirect's status instead of following it."""
        return None


class ClientError(AttestError):
    """Base of the failures of the VM-side exchange; ``exit_code`` is what ``attest`` exits with."""

    code: ClassVar[str] = "client_error"
    exit_code: ClassVar[int] = 1


class ImdsUnavailable(ClientError):
    """IMDS could not be reached, or kept failing past the retry budget: probably not an Azure VM."""

    code = "imds_unavailable"
    exit_code = 3


class ImdsRefused(ClientError):
    """IMDS answered with an error that retrying cannot fix (400, 404...), or an unusable document."""

    code = "imds_refused"
    exit_code = 3


class StaleDocument(ClientError):
    """IMDS kept handing back a cached document signed over another nonce."""

    code = "imds_stale_document"
    exit_code = 3


class ServiceUnavailable(ClientError):
    """The verification service could not be reached or failed (5xx, non-JSON answer)."""

    code = "service_unavailable"
    exit_code = 4


class AttestationRefused(ClientError):
    """The service refused the request or the document; ``verdict`` is the service's JSON answer."""

    code = "attestation_refused"
    exit_code = 1

    def __init__(self, message: str, *, verdict: Mapping[str, object]) -> None:
        """Keep the service's answer so the caller can show it unchanged."""
        super().__init__(message)
        self.verdict = verdict


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How long and how often the IMDS fetch is retried; durations in seconds."""

    #: IMDS documentation: 410 Gone lasts while IMDS starts, at most 70 seconds; retry until then.
    gone_budget: float = 70.0
    #: Attempts for 429 and 5xx answers before giving up.
    max_transient_attempts: int = 6
    #: First backoff delay; doubled after each retry, capped at ``max_backoff``.
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    #: Refetches when the signed nonce is not the challenge, and the wait before each.
    stale_refetches: int = 5
    stale_wait: float = 1.0

    def __post_init__(self) -> None:
        """Refuse budgets that would never try or never wait."""
        if self.max_transient_attempts < 1 or self.stale_refetches < 0:
            raise ValueError("retry counts must allow at least one attempt")
        if min(self.gone_budget, self.initial_backoff, self.max_backoff, self.stale_wait) < 0:
            raise ValueError("retry durations cannot be negative")


@dataclass(frozen=True, slots=True, kw_only=True)
class AttestClient:
    """Settings of the exchange; ``sleep`` and ``monotonic`` are injectable for tests."""

    service_url: str
    imds_url: str = DEFAULT_IMDS_URL
    api_key: str | None = None
    cloud: str = "auto"
    api_version: str = DEFAULT_API_VERSION
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    imds_timeout: float = IMDS_TIMEOUT_SECONDS
    service_timeout: float = SERVICE_TIMEOUT_SECONDS
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic

    # --- the service ---------------------------------------------------------------------------------

    def _service_post(self, route: str, payload: Mapping[str, object]) -> tuple[int, dict[str, object]]:
        url = self.service_url.rstrip("/") + route
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = json.dumps(payload).encode("utf-8")
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ServiceUnavailable(f"the service URL must be http or https, got {self.service_url!r}")
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310 - checked above
        opener = urllib.request.build_opener(_NoRedirect())
        try:
            with opener.open(req, timeout=self.service_timeout) as response:
                status, raw = response.status, response.read(MAX_RESPONSE_BYTES)
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read(MAX_RESPONSE_BYTES)
            location = exc.headers.get("Location") if exc.headers is not None else None
            exc.close()
            if 300 <= status < 400:
                raise ServiceUnavailable(
                    f"the service at {url} answered {status}, redirecting to {str(location)[:200]!r}; redirects "
                    "are not followed, so that the API key never reaches another origin: if that is the "
                    "service, give its URL as --service") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServiceUnavailable(f"cannot reach the service at {url}: {network_reason(exc)}") from exc
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ServiceUnavailable(f"the service answered {status} without a JSON object at {url}")
        if status >= 500:
            raise ServiceUnavailable(f"the service failed with {status} at {url}: {_error_text(answer)}")
        return status, answer

    def challenge(self) -> str:
        """Ask the service for a single-use nonce; raise :class:`ClientError` on failure."""
        status, answer = self._service_post("/v1/challenges", {})
        nonce = answer.get("nonce")
        if status not in (200, 201) or not isinstance(nonce, str) or not nonce:
            raise AttestationRefused(
                f"the service refused a challenge ({status}): {_error_text(answer)}", verdict=answer
            )
        return nonce

    def submit(self, document: Mapping[str, object], nonce: str) -> dict[str, object]:
        """Post the document for verification; return the verdict, raise unless it is verified."""
        status, verdict = self._service_post(
            "/v1/verify", {"document": dict(document), "nonce": nonce, "cloud": self.cloud}
        )
        if status != 200 or verdict.get("verified") is not True:
            raise AttestationRefused(f"the service refused the document: {_error_text(verdict)}", verdict=verdict)
        return verdict

    # --- IMDS ----------------------------------------------------------------------------------------

    def _imds_get(self, nonce: str) -> tuple[int, bytes]:
        query = urllib.parse.urlencode({"api-version": self.api_version, "nonce": nonce})
        url = f"{self.imds_url.rstrip('/')}/metadata/attested/document?{query}"
        if urllib.parse.urlsplit(url).scheme != "http":
            raise ImdsRefused(f"the IMDS URL must be plain http, got {self.imds_url!r}")
        req = urllib.request.Request(url, headers={"Metadata": "true"})  # noqa: S310 - scheme checked above
        # An empty ProxyHandler ignores http_proxy/HTTP_PROXY/no_proxy: IMDS must be asked directly.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=self.imds_timeout) as response:
                return response.status, response.read(MAX_RESPONSE_BYTES)
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read(MAX_RESPONSE_BYTES)
            exc.close()
            return status, raw
        except (urllib.error.URLError, OSError) as exc:
            raise ImdsUnavailable(f"cannot reach IMDS at {self.imds_url}: {network_reason(exc)}") from exc

    def fetch_document(self, nonce: str) -> dict[str, object]:
        """Fetch an attested document over ``nonce`` from IMDS, retrying as the module docstring says.

        Returns the IMDS response object ``{"encoding": "pkcs7", "signature": ...}``.
        """
        started = self.monotonic()
        backoff = self.retry.initial_backoff
        transient_failures = 0
        stale_fetches = 0
        while True:
            status, raw = self._imds_get(nonce)
            if status == 200:
                document = _parse_document(raw)
                signed_nonce = signed_nonce_of(str(document["signature"]))
                if signed_nonce == nonce:
                    return document
                if stale_fetches >= self.retry.stale_refetches:
                    raise StaleDocument(
                        f"IMDS still signs nonce {signed_nonce!r} instead of {nonce!r} after {stale_fetches} refetches"
                    )
                stale_fetches += 1
                self.sleep(self.retry.stale_wait)
                continue
            if status == 410:
                if self.monotonic() - started + backoff > self.retry.gone_budget:
                    raise ImdsUnavailable(f"IMDS still answers 410 Gone after {self.retry.gone_budget:.0f} s")
            elif status == 429 or status >= 500:
                transient_failures += 1
                if transient_failures >= self.retry.max_transient_attempts:
                    raise ImdsUnavailable(f"IMDS answered {status} {transient_failures} times in a row")
            else:
                raise ImdsRefused(f"IMDS refused the request with {status}: {_imds_error_text(raw)}")
            self.sleep(backoff)
            backoff = min(backoff * 2, self.retry.max_backoff)

    # --- the whole exchange ----------------------------------------------------------------------------

    def attest(self) -> dict[str, object]:
        """Challenge, fetch, submit; return the service's verdict when verified, raise otherwise."""
        nonce = self.challenge()
        document = self.fetch_document(nonce)
        return self.submit(document, nonce)


#: What a person is told for each kind of network failure, most specific first.
_NETWORK_REASONS: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (ConnectionRefusedError, "the connection was refused (nothing listens there: is the address and port right?)"),
    (TimeoutError, "no answer in time"),
    (socket.gaierror, "the host name does not resolve"),
    (ssl.SSLCertVerificationError, "its TLS certificate is not trusted by this machine"),
    (ssl.SSLError, "the TLS handshake failed"),
    (ConnectionError, "the connection was closed or reset"),
)


def network_reason(exc: BaseException) -> str:
    """Why a connection failed, as a sentence for a person (urllib's ``<urlopen error [Errno 111] ...>`` is not)."""
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    for kind, sentence in _NETWORK_REASONS:
        if isinstance(reason, kind):
            return sentence
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[:1].lower() + reason.strerror[1:]
    return "a network error"


def _error_text(answer: Mapping[str, object]) -> str:
    error = answer.get("error")
    if isinstance(error, Mapping):
        return f"{error.get('code')}: {error.get('message')}"
    return json.dumps(answer)[:200]


def _imds_error_text(raw: bytes) -> str:
    try:
        answer = json.loads(raw)
    except ValueError:
        return raw[:200].decode("utf-8", "replace")
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return str(answer["error"])
    return json.dumps(answer)[:200]


def _parse_document(raw: bytes) -> dict[str, object]:
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise ImdsRefused("IMDS answered 200 without JSON") from exc
    if not isinstance(document, dict) or not isinstance(document.get("signature"), str):
        raise ImdsRefused("IMDS answered 200 without an attested document")
    return document


def signed_nonce_of(signature: str) -> str | None:
    """Read the nonce a PKCS#7 attested document carries, WITHOUT verifying anything.

    Only used to notice a cached document; the service does the verification. Raises
    :class:`ImdsRefused` when the document cannot be decoded.
    """
    try:
        info = cms.ContentInfo.load(base64.b64decode(signature, validate=True))
        content = info["content"]["encap_content_info"]["content"].native
        claims = json.loads(content)
    except (binascii.Error, ValueError, TypeError, KeyError) as exc:
        raise ImdsRefused("IMDS returned a document that is not base64 PKCS7 over JSON") from exc
    nonce = claims.get("nonce") if isinstance(claims, dict) else None
    return nonce if isinstance(nonce, str) else None
