"""Operating the pinned trust: list, check, add and remove pins, as functions that return data.

The ``certs`` command (:mod:`attest_service.cli.certs`) only formats what these return, so the same checks
serve the CLI, the tests and a CI gate: :mod:`~.reports` lists and checks, :mod:`~.changes` adds and
removes, :mod:`~.manifest` reads and writes the files that record the pins, through :mod:`~.atomic`.
"""

from attest_service.trust.pins.changes import (
    MAX_FINGERPRINT_NAME_CHARS,
    DocumentPin,
    PinChange,
    add_fingerprint_pin,
    add_from_document,
    add_pins,
    pin_filename,
    remove_pin,
)
from attest_service.trust.pins.manifest import (
    FINGERPRINTS_KEY,
    RETIRED_KEY,
    fingerprint_manifest_entry,
    read_fingerprint_manifest,
    read_manifest,
    retired_marks,
)
from attest_service.trust.pins.reports import (
    DEFAULT_WARN_DAYS,
    CheckReport,
    FingerprintReport,
    FingerprintStatus,
    PinReport,
    Problem,
    ProblemKind,
    RetiredView,
    Status,
    check_pins,
    list_fingerprint_pins,
    list_pins,
)

__all__ = [
    "DEFAULT_WARN_DAYS",
    "FINGERPRINTS_KEY",
    "MAX_FINGERPRINT_NAME_CHARS",
    "RETIRED_KEY",
    "CheckReport",
    "DocumentPin",
    "FingerprintReport",
    "FingerprintStatus",
    "PinChange",
    "PinReport",
    "Problem",
    "ProblemKind",
    "RetiredView",
    "Status",
    "add_fingerprint_pin",
    "add_from_document",
    "add_pins",
    "check_pins",
    "fingerprint_manifest_entry",
    "list_fingerprint_pins",
    "list_pins",
    "pin_filename",
    "read_fingerprint_manifest",
    "read_manifest",
    "remove_pin",
    "retired_marks",
]
