"""The VM-side commands: ``imds-emulator`` (a local stand-in for IMDS) and ``attest`` (challenge, fetch, submit).

``attest`` exit codes: 0 verified; 1 refused by the service; 2 usage; 3 IMDS unreachable or failing
(not on Azure); 4 the service unreachable or failing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Final

from attest_service.cli.common import EXIT_USAGE, UsageError
from attest_service.clouds import AUTO, CLOUDS
from attest_service.errors import ConfigurationError
from attest_service.imds.client import (
    API_KEY_VARIABLE,
    DEFAULT_API_VERSION,
    DEFAULT_IMDS_URL,
    AttestationRefused,
    AttestClient,
    ClientError,
    check_api_key,
)
from attest_service.imds.faults import FAULT_KINDS
from attest_service.logformat import install, log_format

if TYPE_CHECKING:
    from attest_service.cli.common import Subparsers

EXIT_OK: Final = 0


def _emit(payload: object) -> None:
    sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _stop_on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    # SIGTERM (from a test harness or a container runtime) ends the server like Ctrl-C does.
    raise KeyboardInterrupt


def run_emulator(args: argparse.Namespace) -> int:
    """``imds-emulator``: generate and pin a PKI, then serve until interrupted."""
    # The emulator is a Flask application: its stack loads for this command only.
    from attest_service.imds.emulator import parse_bind, settings_for, start_emulator  # noqa: PLC0415

    try:
        # The emulator's request lines (werkzeug's) in the service's log format, ATTEST_LOG_FORMAT.
        install(log_format(), "info")
    except ValueError as exc:
        sys.stderr.write(f"attest-service imds-emulator: {exc}\n")
        return EXIT_USAGE
    try:
        host, port = parse_bind(args.bind)
        settings = settings_for(args.cloud, args.instance_file, args.fault)
        server, signing = start_emulator(settings, pki_dir=args.pki_dir, host=host, port=port)
    except ConfigurationError as exc:
        sys.stderr.write(f"attest-service imds-emulator: {exc.message}\n")
        return EXIT_USAGE
    # One JSON line tells a supervising script where to connect and what to pin.
    _emit(
        {
            "event": "listening",
            "url": server.url,
            "cloud": settings.cloud.name,
            "pinnedCerts": str(args.pki_dir),
            "signer": signing.leaf.certificate.subject.rfc4514_string(),
        }
    )
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return EXIT_OK


def http_url(text: str) -> str:
    """An ``http://`` or ``https://`` URL with a host, for ``--service`` and ``--imds-url``; else a usage error.

    Without this a URL missing its scheme (``127.0.0.1:8090``) would reach the client and be reported as the
    service being unreachable, exit 4, which sends the user looking for a network problem.
    """
    refusal = argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL (for example "
                                         "http://127.0.0.1:8080)")
    try:
        parts = urllib.parse.urlsplit(text.strip())
        _ = parts.port  # raises ValueError for a malformed or out-of-range port
    except ValueError:
        raise refusal from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise refusal
    return text.strip()


def api_key(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """The API key of ``attest``: ``--api-key``, else ``--api-key-file``, else ``ATTEST_API_KEY``, else none.

    The command line is readable by every local user (``/proc/PID/cmdline``); a file or the environment is
    not. Raises UsageError for a key file that cannot be read or a key no header can carry.
    """
    if args.api_key is not None:
        key, origin = args.api_key, "--api-key"
    elif args.api_key_file is not None:
        origin = f"--api-key-file {args.api_key_file}"
        try:
            # The key is the file's content without the line break editors and `echo` add.
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise UsageError(f"{origin}: cannot read the key: {reason[:1].lower()}{reason[1:]}") from exc
    elif environ.get(API_KEY_VARIABLE):
        key, origin = environ[API_KEY_VARIABLE], API_KEY_VARIABLE
    else:
        return None
    try:
        return check_api_key(key)
    except ValueError as exc:
        raise UsageError(f"{origin}: {exc}") from exc


def run_attest(args: argparse.Namespace) -> int:
    """``attest``: challenge, fetch from IMDS, submit; print the verdict; exit 0 only when verified."""
    try:
        key = api_key(args, os.environ)
    except UsageError as exc:
        sys.stderr.write(f"attest-service attest: {exc}\n")
        return EXIT_USAGE
    client = AttestClient(
        service_url=args.service,
        imds_url=args.imds_url,
        api_key=key,
        cloud=args.cloud,
        api_version=args.api_version,
    )
    try:
        verdict = client.attest()
    except AttestationRefused as exc:
        _emit(exc.verdict)
        sys.stderr.write(f"attest-service attest: {exc.message}\n")
        return exc.exit_code
    except ClientError as exc:
        _emit({"verified": False, "error": exc.to_dict()})
        sys.stderr.write(f"attest-service attest: {exc.message}\n")
        return exc.exit_code
    _emit(verdict)
    return EXIT_OK


def register(subparsers: Subparsers) -> None:
    """Add the ``imds-emulator`` and ``attest`` sub-commands."""
    emulator = subparsers.add_parser(
        "imds-emulator",
        help="serve a local stand-in for Azure IMDS",
        description="Serve /metadata/attested/document, /metadata/instance and /metadata/versions like "
        "Azure IMDS, signing with a fresh Azure-shaped PKI pinned under --pki-dir.",
    )
    emulator.add_argument(
        "--bind",
        required=True,
        metavar="HOST:PORT",
        help="address to listen on; ':PORT' listens on loopback, port 0 picks a free one",
    )
    emulator.add_argument(
        "--pki-dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="writes the root and issuing CA to DIR/<cloud>/roots and DIR/<cloud>/intermediates",
    )
    emulator.add_argument("--cloud", choices=list(CLOUDS), default="public", help="cloud to impersonate")
    emulator.add_argument(
        "--instance-file",
        type=Path,
        metavar="JSON",
        help="instance metadata ({'compute': {...}, 'network': {...}}) to serve and sign",
    )
    emulator.add_argument("--fault", action="extend", nargs="+", default=[], metavar="KIND[:N]",
                          help=f"inject a fault on the first N requests (N defaults to 1); KIND is one of "
                          f"{', '.join(FAULT_KINDS)}")  # fmt: skip
    emulator.set_defaults(handler=run_emulator)

    attest = subparsers.add_parser(
        "attest",
        help="attest this VM to a verification service",
        description="Ask the service for a challenge, fetch an attested document over it from IMDS, submit "
        "it, and print the service's verdict. The API key comes from --api-key, --api-key-file or "
        f"${API_KEY_VARIABLE}; no redirect of the service is followed. Exit 0 verified, 1 refused, 2 usage, "
        "3 IMDS unavailable, 4 service unavailable (or redirected).",
    )
    attest.add_argument("--service", required=True, metavar="URL", type=http_url,
                        help="base URL of the verification service, with its scheme (http://HOST:PORT or https://...)")
    attest.add_argument(
        "--imds-url",
        default=DEFAULT_IMDS_URL,
        type=http_url,
        metavar="URL",
        help=f"IMDS base URL (default {DEFAULT_IMDS_URL}); never reached through a proxy",
    )
    key = attest.add_mutually_exclusive_group()
    key.add_argument("--api-key", metavar="KEY",
                     help="API key sent as 'Authorization: Bearer KEY' (every local user can read a command line: "
                     f"prefer --api-key-file or ${API_KEY_VARIABLE})")
    key.add_argument("--api-key-file", type=Path, metavar="FILE",
                     help=f"read the API key from FILE (surrounding whitespace dropped); default: ${API_KEY_VARIABLE}")
    attest.add_argument(
        "--cloud", choices=[*CLOUDS, AUTO], default=AUTO, help="cloud the service should verify against (default: auto)"
    )
    attest.add_argument(
        "--api-version",
        default=DEFAULT_API_VERSION,
        metavar="V",
        help=f"IMDS api-version (default {DEFAULT_API_VERSION})",
    )
    attest.set_defaults(handler=run_attest)
