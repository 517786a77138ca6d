"""Coverage-guided fuzzing of the document path with atheris (libFuzzer for Python).

Run from the repository root::

    python tests/system/fuzz/fuzz_verify.py                   # FUZZ_SECONDS (default 300) seconds
    python tests/system/fuzz/fuzz_verify.py --seconds 20      # a bounded run, as CI does
    python tests/system/fuzz/fuzz_verify.py --replay FILE...  # replay saved inputs once each (no atheris needed)

The seed corpus is written at start into ``--corpus`` (default: ``$FUZZ_CORPUS`` or a temporary
directory), from the deterministic fuzz PKI, the test-case generator's documents and the real Azure
documents when they are present (see :mod:`tests.system.fuzz.target`). New inputs libFuzzer finds are added to
that directory, so a persistent ``--corpus`` makes later runs start where earlier ones stopped.

A crash is any exception other than VerificationError. libFuzzer then writes the input to
``--artifacts`` (default ``$FUZZ_ARTIFACTS`` or ``fuzz-artifacts/``) as ``crash-<sha1>``, prints the
traceback and exits non-zero. Turn each crash into a named file under ``tests/system/fuzz/regressions/``;
``tests/system/fuzz/test_fuzz.py`` replays every file there.

While a crash is known and not yet fixed, ``--known SIG,...`` (or ``$FUZZ_KNOWN_CRASHES``) names crash
signatures (``Type@module:function``, see :attr:`tests.system.fuzz.target.Crash.signature`) to count instead of
stopping on, so a long run keeps looking for new ones; ``--known open`` means the signatures of the
open regressions listed in :data:`tests.system.fuzz.target.OPEN_CRASHES`. The first input of each known
signature is still written to the artifacts directory as ``known-<sha1>``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:
    # Run as a script, the repository root (home of the ``tests`` package) is not on the path.
    sys.path.insert(0, str(REPO_ROOT))

#: Default fuzzing time, in seconds, when neither --seconds nor FUZZ_SECONDS says otherwise.
DEFAULT_FUZZ_SECONDS: Final = 300
#: Longest a single input may run before libFuzzer reports it as a hang, in seconds. A verification takes
#: about a millisecond; ten seconds means a real hang, not a slow machine.
INPUT_TIMEOUT_SECONDS: Final = 10
#: Memory ceiling of the fuzzing process, in MiB: beyond it libFuzzer reports an out-of-memory crash.
RSS_LIMIT_MB: Final = 2048
#: Longest input libFuzzer generates, in bytes: room for the largest accepted document (64 KiB of base64
#: in a JSON response) plus the selector byte, so the size limits are exercised too.
MAX_INPUT_BYTES: Final = 132 * 1024


def _arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", DEFAULT_FUZZ_SECONDS)),
                        help="how long to fuzz (default: $FUZZ_SECONDS or %(default)s)")
    parser.add_argument("--corpus", type=Path, default=os.environ.get("FUZZ_CORPUS"),
                        help="corpus directory, seeded at start (default: $FUZZ_CORPUS or a temporary one)")
    parser.add_argument("--artifacts", type=Path, default=Path(os.environ.get("FUZZ_ARTIFACTS", "fuzz-artifacts")),
                        help="where crashing inputs are written (default: $FUZZ_ARTIFACTS or %(default)s)")
    parser.add_argument("--known", default=os.environ.get("FUZZ_KNOWN_CRASHES", ""),
                        help="comma-separated crash signatures to count rather than stop on ('open': the "
                             "open regressions)")
    parser.add_argument("--replay", nargs="+", type=Path, metavar="FILE",
                        help="run these saved inputs once each and report their outcome")
    return parser.parse_known_args(argv)


def replay(paths: list[Path]) -> int:
    """Run saved inputs once each; print each outcome; return 1 if any crashed."""
    from tests.system.fuzz.target import Crash, check_one  # noqa: PLC0415 - after sys.path is set

    status = 0
    for path in paths:
        try:
            print(f"{path}: {check_one(path.read_bytes())}")
        except Crash as exc:
            print(f"{path}: CRASH {exc.signature}: {exc}")
            status = 1
    return status


def fuzz(options: argparse.Namespace, libfuzzer_args: list[str]) -> None:
    """Seed the corpus and hand over to libFuzzer (which exits the process when done)."""
    import atheris  # noqa: PLC0415 - only the fuzzing mode needs it

    with atheris.instrument_imports(include=["attest_service", "asn1crypto"]):
        from tests.system.fuzz import target  # noqa: PLC0415 - imported under instrumentation on purpose

    corpus: Path = options.corpus or Path(tempfile.mkdtemp(prefix="attest-fuzz-corpus-"))
    seeds = target.write_seed_corpus(corpus)
    options.artifacts.mkdir(parents=True, exist_ok=True)
    target.verifier()  # Load the trust before the clock starts, as a worker does before serving.
    print(f"fuzz: {seeds} seeds in {corpus}; {options.seconds} s; crashes go to {options.artifacts}/",
          flush=True)

    known = {name.strip() for name in options.known.split(",") if name.strip()}
    if "open" in known:
        known |= set(target.OPEN_CRASHES.values())
    seen: set[str] = set()

    def one_input(data: bytes) -> None:
        try:
            target.check_one(data)
        except target.Crash as exc:
            kind = exc.signature
            if kind not in known:
                raise
            if kind not in seen:
                name = f"known-{hashlib.sha1(data).hexdigest()}"
                (options.artifacts / name).write_bytes(data)
                print(f"fuzz: known crash {kind} ({exc}); input written to {options.artifacts / name}", flush=True)
            seen.add(kind)

    atheris.Setup(
        [sys.argv[0], f"-max_total_time={options.seconds}", f"-timeout={INPUT_TIMEOUT_SECONDS}",
         f"-rss_limit_mb={RSS_LIMIT_MB}", f"-max_len={MAX_INPUT_BYTES}", "-print_final_stats=1",
         f"-artifact_prefix={options.artifacts}/", *libfuzzer_args, str(corpus)],
        one_input,
    )
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    """Entry point: fuzz, or replay saved inputs with --replay."""
    options, libfuzzer_args = _arguments(sys.argv[1:] if argv is None else argv)
    if options.replay:
        return replay(options.replay)
    fuzz(options, libfuzzer_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
