#!/usr/bin/env bash
# Makes the service's runtime environment: the one way the container image (Dockerfile, builder stage) and
# the installed-artefact tests (tests/system/install) build it, so the environment tested is the one shipped.
#
#   scripts/install-runtime.sh dependencies VENV CONSTRAINTS
#       VENV: a new virtual environment without pip or setuptools (nothing in it can install code later);
#       then every runtime dependency at the version CONSTRAINTS pins, from wheels only (no compiler runs),
#       each wheel checked against the SHA-256 hashes CONSTRAINTS records for it (--require-hashes: a pin
#       without a hash, or a wheel whose bytes match none, stops the install; scripts/hash-constraints.sh).
#   scripts/install-runtime.sh project VENV WHEEL_DIR
#       the project's one wheel in WHEEL_DIR, without dependencies and without an index (everything it
#       needs must already be pinned); then "pip check", and a start-up import of gunicorn's worker class,
#       which catches what pip check cannot see (a requirement of an extra, such as gunicorn[gevent]).
#
# The two steps are separate so the image keeps its dependency layer while only the code changes.
# Python: ${PYTHON:-python3}, which must have pip; its pip installs into VENV through --python.
set -euo pipefail

readonly python=${PYTHON:-python3}

usage() {
    echo "usage: $0 dependencies VENV CONSTRAINTS | project VENV WHEEL_DIR" >&2
    exit 2
}

pip_into() {
    "$python" -m pip --disable-pip-version-check --python "$venv/bin/python" "$@"
}

[ "$#" -eq 3 ] || usage
readonly step=$1 venv=$2 source=$3

case "$step" in
    dependencies)
        [ -f "$source" ] || { echo "install-runtime: constraints file $source not found" >&2; exit 1; }
        "$python" -m venv --without-pip "$venv"
        pip_into install --no-cache-dir --only-binary=:all: --require-hashes --requirement "$source"
        ;;
    project)
        shopt -s nullglob
        wheels=("$source"/attest_service-*.whl)
        if [ "${#wheels[@]}" -ne 1 ]; then
            echo "install-runtime: expected one attest_service wheel in $source, found ${#wheels[@]}" >&2
            exit 1
        fi
        pip_into install --no-cache-dir --no-index --no-deps "${wheels[0]}"
        pip_into check
        # gunicorn resolves the worker class only when it starts; resolve it now, so a missing requirement
        # fails the build and not the container's start.
        PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -c '
from gunicorn.util import load_class
from attest_service.server import gunicorn_conf
load_class(gunicorn_conf.worker_class)
'
        ;;
    *)
        usage
        ;;
esac
