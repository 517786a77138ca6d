"""CPU time per ``POST /v1/verify`` of two configurations or two source trees, in a ratio that holds on a busy host.

Throughput on a shared machine moves with the host; CPU time per request moves much less, and what is left
(another tenant's cache and memory traffic, the cores' clock) drifts slowly. So each configuration runs in a
process of its own, in turns (A B, B A, A B, ... for ``--rounds`` rounds), and each round gives the ratio of
two runs made side by side in time: the drift cancels in that ratio, and the median over the rounds is the
figure. A configuration is a source tree (the application is imported from it: its first run prints the
``attest_service`` it loaded) and ``ATTEST_*`` settings.

Each run builds the application as gunicorn's worker does (``attest_service.web:create_app()`` after gevent's
monkey patching, then ``gc.freeze()``) and calls it in-process with WSGI environs shaped as gunicorn's, so the
direct path of ``POST /v1/verify``, the body gate, authentication, the rate leases, the nonce claim on a real
``redis-server`` (emptied before every run) and the metrics are all measured, and no HTTP server or load
generator shares the cores. Every request carries a distinct valid document (``bench_http.make_documents``):
each is a full verification and a first acceptance; any answer other than 200 fails the run. Measured: CPU
time (user + system) of the run's process over ``--requests`` requests after ``--warmup`` unmeasured ones,
and of Redis over the same requests.

CPU time still moves by several per cent from run to run on a shared host (others' work evicts the caches).
``--callgrind`` counts the instructions the service process executes over the measured requests instead
(valgrind's callgrind, switched on and off around them with ``callgrind_control``): the same from run to run
within a few tenths of a per cent, whatever else the machine runs, at about ten seconds per run of 200
requests. Instructions weigh work unlike time (a signature's arithmetic runs faster per instruction than the
interpreter), so the two are reported apart: instructions to tell which change costs what, CPU time for the
cost itself.

Presets (``--compare``):

* ``trees``: ``--old`` (a checkout of another commit, e.g. ``git worktree add /tmp/old REV``) beside this
  tree, each with its shipped settings on a shared store;
* ``results``: this tree with ``ATTEST_RESULT_KEYS`` off beside on (one P-256 key): the target is at most
  10 % more CPU with results on;
* ``revocation``: this tree with ``ATTEST_REVOCATION=off`` beside ``soft`` (the default).

Or any two ``--variant NAME[@TREE][:KEY=VALUE,...]`` (``ATTEST_RESULT_KEYS=generated`` stands for a directory
with one P-256 key). ``--profile NAME`` runs that variant once under cProfile and prints where the time goes.

Run: ``python benchmarks/bench_cpu.py --compare results [--rounds N] [--requests N] [--callgrind]`` (needs
redis-server; valgrind for ``--callgrind``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from tests.support.redis_server import RedisServer

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = BENCH_DIR.parent

CLIENT_ID: Final = "bench"
API_KEY: Final = "bench-key-" + "0" * 22
#: The caller's rate budget per minute (the settings' maximum): the limit is not what is measured.
RATE_LIMIT_PER_MINUTE: Final = 1_000_000
#: Stands for a result key directory made for the run.
GENERATED: Final = "generated"

PRESETS: Final = {
    "trees": ["old@{old}", "new"],
    "results": ["results-off:ATTEST_RESULT_KEYS=off", f"results-on:ATTEST_RESULT_KEYS={GENERATED}"],
    "revocation": ["revocation-off:ATTEST_REVOCATION=off", "revocation-soft:ATTEST_REVOCATION=soft"],
}


def redis_cpu_seconds(url: str) -> float:
    """User plus system CPU time of the Redis server at ``url`` so far, in microseconds' resolution (INFO)."""
    import redis  # noqa: PLC0415 - in the child, after gevent patched

    info = redis.Redis.from_url(url).info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# --- the measured process ------------------------------------------------------------------------------


def _environ(body: bytes) -> dict[str, Any]:
    """A WSGI environ as gunicorn's worker builds it for a keep-alive ``POST /v1/verify`` from loopback."""
    import io  # noqa: PLC0415 - the child imports nothing before gevent patches

    return {
        "REQUEST_METHOD": "POST", "SCRIPT_NAME": "", "PATH_INFO": "/v1/verify", "RAW_URI": "/v1/verify",
        "QUERY_STRING": "", "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080",
        "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000", "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)), "HTTP_HOST": "127.0.0.1:8080", "HTTP_CONNECTION": "keep-alive",
        "HTTP_AUTHORIZATION": f"Bearer {API_KEY}", "HTTP_USER_AGENT": "bench_cpu",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
    }


def _instrument(*, on: bool, enabled: bool) -> None:
    """Under callgrind (``--callgrind``), count this process's instructions from now on (or stop counting)."""
    if enabled:
        subprocess.run(["callgrind_control", "--instr", "on" if on else "off", str(os.getpid())],
                       check=True, capture_output=True)


def child(args: argparse.Namespace) -> None:
    """One run: build the application from ``--tree``, answer the bodies, print the figures as JSON."""
    if args.gevent:
        from gevent import monkey  # type: ignore[import-untyped]  # noqa: PLC0415 - first, as the worker does

        monkey.patch_all()
    import gc  # noqa: PLC0415

    sys.path.insert(0, args.tree)
    import attest_service  # noqa: PLC0415
    from attest_service.web import create_app  # noqa: PLC0415

    loaded = str(Path(attest_service.__file__).resolve())
    if not loaded.startswith(str(Path(args.tree).resolve()) + os.sep):
        raise SystemExit(f"imported {loaded}, not the tree {args.tree}")
    bodies = Path(args.bodies).read_bytes().splitlines()
    if len(bodies) < args.warmup + args.requests:
        raise SystemExit(f"{len(bodies)} bodies, {args.warmup + args.requests} needed")
    app = create_app()
    gc.freeze()
    statuses: dict[str, int] = {}

    def start_response(status: str, _headers: object, _exc_info: object = None) -> None:
        statuses[status] = statuses.get(status, 0) + 1

    def answer(body: bytes) -> None:
        for _chunk in app(_environ(body), start_response):
            pass

    for body in bodies[:args.warmup]:
        answer(body)
    measured = bodies[args.warmup:args.warmup + args.requests]
    profiler = None
    if args.profile_to:
        import cProfile  # noqa: PLC0415

        # CPU time, not wall time: a wait for Redis is not the service's cost.
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
    redis_before, started, wall = redis_cpu_seconds(args.redis_url), time.process_time(), time.perf_counter()
    _instrument(on=True, enabled=args.callgrind)
    for body in measured:
        answer(body)
    _instrument(on=False, enabled=args.callgrind)
    cpu, wall = time.process_time() - started, time.perf_counter() - wall
    redis = redis_cpu_seconds(args.redis_url) - redis_before
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile_to)
    if set(statuses) != {"200 OK"}:
        raise SystemExit(f"answers other than 200: {statuses}")
    print(json.dumps({"loaded": loaded, "requests": len(measured), "cpu": cpu, "redis": redis, "wall": wall}))


# --- the parent ----------------------------------------------------------------------------------------


@dataclass
class Variant:
    """A configuration: a source tree and settings."""

    name: str
    tree: Path
    settings: dict[str, str]
    runs: list[dict[str, Any]] = field(default_factory=list)

    def per_request(self, key: str) -> list[float]:
        """Per request, one figure per run: microseconds of ``cpu``, ``redis`` or ``total``, or ``instructions``."""
        return [(run["cpu"] + run["redis"] if key == "total" else run[key]) / run["requests"]
                * (1 if key == "instructions" else 1e6) for run in self.runs]


def parse_variant(spec: str) -> Variant:
    """``NAME[@TREE][:KEY=VALUE,...]``; the tree defaults to this one."""
    head, _, settings = spec.partition(":")
    name, _, tree = head.partition("@")
    values = dict(item.split("=", 1) for item in settings.split(",") if item)
    return Variant(name, Path(tree or REPO_ROOT).resolve(), values)


def _run(variant: Variant, args: argparse.Namespace, env: dict[str, str], redis: RedisServer,
         profile_to: str = "") -> dict[str, Any]:
    redis.client().flushall()
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--tree", str(variant.tree),
            "--bodies", str(args.bodies_file), "--redis-url", redis.url, "--warmup", str(args.warmup),
            "--requests", str(args.requests), "--profile-to", profile_to]
    if not args.gevent:
        argv.append("--no-gevent")
    counts = (Path(args.callgrind_out) if args.callgrind_out else args.bodies_file.parent) / \
        f"callgrind-{variant.name}-{len(variant.runs)}.out"
    if args.callgrind:
        # Instructions are counted only between the child's two callgrind_control calls: the measured requests.
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={counts}",
                *argv, "--callgrind"]
    # The tree first on the path, before the editable install of this checkout.
    # Metrics in files, as under the shipped gunicorn (attest-service serve sets the directory).
    metrics = Path(tempfile.mkdtemp(prefix="metrics-", dir=args.bodies_file.parent))
    child_env = {**env, **variant.settings, "PYTHONPATH": str(variant.tree), "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    done = subprocess.run(argv, env=child_env, capture_output=True, text=True, check=False, cwd=variant.tree)
    if done.returncode != 0:
        raise SystemExit(f"{variant.name}: run failed\n{done.stderr[-3000:]}{done.stdout[-1000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if args.callgrind:
        totals = [line for line in counts.read_text().splitlines() if line.startswith("totals:")]
        result["instructions"] = int(totals[0].split()[1])
    return result


def _median_line(variant: Variant, key: str) -> str:
    if key == "instructions":
        figures = variant.per_request(key)
        return (f"  {variant.name:<16} {statistics.median(figures):11,.0f} instructions per request "
                f"(runs {min(figures):,.0f}..{max(figures):,.0f})")
    cpu, redis, total = (statistics.median(variant.per_request(part)) for part in ("cpu", "redis", "total"))
    spread = variant.per_request("total")
    return (f"  {variant.name:<16} {cpu:7.0f} us service + {redis:5.0f} us Redis = {total:7.0f} us per request "
            f"(runs {min(spread):.0f}..{max(spread):.0f})")


def parent(args: argparse.Namespace) -> None:
    """Make the documents and Redis, run the variants in turns, print the figures."""
    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(BENCH_DIR))
    from bench_http import make_documents  # noqa: PLC0415

    from attest_service.results import write_new_key  # noqa: PLC0415
    from tests.support.redis_server import redis_server  # noqa: PLC0415

    specs = args.variant or [spec.format(old=args.old) for spec in PRESETS[args.compare]]
    if args.compare == "trees" and not args.variant and not args.old:
        raise SystemExit("--compare trees needs --old PATH (a checkout of the older commit)")
    variants = [parse_variant(spec) for spec in specs]
    if len(variants) != 2 and not args.profile:
        raise SystemExit("give two variants (or a preset) to compare")
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp, redis_server() as redis:
        workdir = Path(tmp)
        started = time.monotonic()
        bodies = make_documents(args.warmup + args.requests, workdir / "pinned")
        args.bodies_file = workdir / "bodies.txt"
        args.bodies_file.write_bytes(b"\n".join(bodies) + b"\n")
        for variant in variants:
            if variant.settings.get("ATTEST_RESULT_KEYS") == GENERATED:
                keys = workdir / "result-keys"
                if not keys.is_dir():
                    write_new_key(keys, "ES256")
                variant.settings["ATTEST_RESULT_KEYS"] = str(keys)
        env = {key: value for key, value in os.environ.items() if not key.startswith("ATTEST_")}
        env.update({"ATTEST_PINNED_CERTS": str(workdir / "pinned"), "ATTEST_NONCE_STORE": redis.url,
                    "ATTEST_API_KEYS": f"{CLIENT_ID}:{hashlib.sha256(API_KEY.encode()).hexdigest()}",
                    "ATTEST_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT_PER_MINUTE), "ATTEST_LOG_LEVEL": "warning"})
        print(f"{len(bodies)} documents in {time.monotonic() - started:.1f} s; Redis at {redis.url}; "
              f"{args.requests} requests per run after {args.warmup}, "
              f"{'gevent-patched' if args.gevent else 'unpatched'} process")
        if args.profile:
            _profile(next(v for v in variants if v.name == args.profile), args, env, redis, workdir)
            return
        first, second = variants
        key = "instructions" if args.callgrind else "total"
        unit = "instructions" if args.callgrind else "us"
        ratios = []
        for round_number in range(args.rounds):
            order = (first, second) if round_number % 2 == 0 else (second, first)
            for variant in order:
                variant.runs.append(_run(variant, args, env, redis))
                if round_number == 0:
                    print(f"  {variant.name}: {variant.runs[-1]['loaded']}")
            before, after = first.per_request(key)[-1], second.per_request(key)[-1]
            ratios.append(after / before)
            print(f"  round {round_number + 1}: {first.name} {before:,.0f} {unit}, {second.name} {after:,.0f} {unit}, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    what = "instructions of the service process" if args.callgrind else "CPU time (service process + Redis)"
    print(f"Per verify request, median of {args.rounds} runs each, {what}:")
    print(_median_line(first, key))
    print(_median_line(second, key))
    print(f"  {second.name} / {first.name}: {statistics.median(ratios):.3f} "
          f"(median of the rounds' ratios; range {min(ratios):.3f}..{max(ratios):.3f})")
    if not args.callgrind:
        service = [b / a for a, b in zip(first.per_request("cpu"), second.per_request("cpu"), strict=True)]
        print(f"  service process only: {statistics.median(service):.3f}")


def _profile(variant: Variant, args: argparse.Namespace, env: dict[str, str], redis: RedisServer,
             workdir: Path) -> None:
    import pstats  # noqa: PLC0415

    output = Path(args.profile_save) if args.profile_save else workdir / "profile.out"
    result = _run(variant, args, env, redis, profile_to=str(output))
    print(f"{variant.name}: {result['loaded']}, {1e6 * result['cpu'] / result['requests']:.0f} us per request "
          "under the profiler")
    stats = pstats.Stats(str(output))
    stats.sort_stats("cumulative").print_stats(args.profile_lines)
    stats.sort_stats("tottime").print_stats(args.profile_lines)


def main() -> None:
    """Parse the options; the parent runs the variants as children of this same script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--compare", choices=sorted(PRESETS), default="results")
    parser.add_argument("--variant", action="append", help="NAME[@TREE][:KEY=VALUE,...] (twice)")
    parser.add_argument("--old", default="", help="the older tree of --compare trees")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--profile", default="", help="run this variant once under cProfile")
    parser.add_argument("--profile-lines", type=int, default=40)
    parser.add_argument("--profile-save", default="", help="keep the profile in this file (pstats)")
    parser.add_argument("--no-gevent", dest="gevent", action="store_false",
                        help="do not patch with gevent first (the shipped workers do)")
    parser.add_argument("--callgrind", action="store_true",
                        help="count the service's instructions under valgrind (deterministic; Redis not counted)")
    parser.add_argument("--callgrind-out", default="", help="keep callgrind's files here (for callgrind_annotate)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--bodies", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
