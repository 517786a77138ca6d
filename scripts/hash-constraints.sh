#!/usr/bin/env bash
# Records in constraints.txt the SHA-256 of every wheel that may install each pin, for pip's --require-hashes
# (scripts/install-runtime.sh installs the image's environment in hash-checking mode).
#
#   scripts/hash-constraints.sh [CONSTRAINTS]      (default: constraints.txt)
#
# Keeps the file's comment header and its name==version pins, and writes each pin's hashes under it. The
# wheels are downloaded with pip from the configured index, for CPython 3.11 on Linux x86_64 and aarch64
# (the image's python:3.11-slim on either architecture) with the manylinux tags preferred highest first and
# lowest first, so that every wheel a glibc machine may pick is hashed. Only wheels: the image never builds
# from source. Run it after changing a pin, and commit the result.
set -euo pipefail

readonly python=${PYTHON:-python3}
readonly constraints=${1:-constraints.txt}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# name==version lines only: the pins without their old hashes.
grep -E '^[A-Za-z0-9_.-]+==[^ \\]+' "$constraints" | sed -E 's/[ \\].*$//' >"$work/pins.txt"

download() {
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --requirement "$work/pins.txt" --dest "$work/wheels" "$@"
}

download  # this machine's own choice
tags=(manylinux_2_36 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26
      manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1)
for arch in x86_64 aarch64; do
    for order in highest lowest; do
        platforms=()
        for tag in "${tags[@]}"; do platforms+=(--platform "${tag}_${arch}"); done
        if [ "$order" = lowest ]; then
            reversed=()
            for ((i = ${#platforms[@]} - 2; i >= 0; i -= 2)); do reversed+=("${platforms[i]}" "${platforms[i + 1]}"); done
            platforms=("${reversed[@]}")
        fi
        download --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}"
    done
done

"$python" - "$constraints" "$work/pins.txt" "$work/wheels" <<'EOF'
import hashlib
import re
import sys
from pathlib import Path

constraints, pins, wheels = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


hashes: dict[tuple[str, str], set[str]] = {}
for wheel in wheels.glob("*.whl"):
    name, version = wheel.name.split("-")[:2]
    hashes.setdefault((normal(name), version), set()).add(hashlib.sha256(wheel.read_bytes()).hexdigest())
header = [line for line in constraints.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
lines = list(header)
for pin in pins.read_text(encoding="utf-8").split():
    name, version = pin.split("==")
    found = sorted(hashes.get((normal(name), version), ()))
    if not found:
        sys.exit(f"hash-constraints: no wheel of {pin} was downloaded")
    lines.append(f"{pin} \\")
    lines.extend(f"    --hash=sha256:{digest}" + (" \\" if index < len(found) - 1 else "")
                 for index, digest in enumerate(found))
constraints.write_text("\n".join(lines) + "\n", encoding="utf-8")
EOF
