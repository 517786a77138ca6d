# attest-service container image.
#
# Two stages: "builder" turns the source tree into a virtual environment at /opt/attest-service with every
# dependency at the version pinned in constraints.txt; "runtime" is a clean python:3.11-slim that receives
# only that virtual environment and the pinned certificates. Nothing that compiles or downloads code
# (setuptools, wheel building, caches) reaches the final image.
#
# Runtime contract (see docs/DEPLOYMENT.md):
# - runs as UID/GID 10001, never root; works with a read-only root filesystem;
# - writable state only under the VOLUME /var/lib/attest-service (the default SQLite nonce store) and /tmp
#   (gunicorn's worker heartbeat files and the Prometheus multiprocess directory): mount a tmpfs/emptyDir there;
# - trust pins at /etc/attest-service/pinned_certs; mount a ConfigMap over that path to replace them.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# scripts/install-runtime.sh is the one recipe of this environment: the installed-artefact tests
# (tests/system/install) build theirs with it too, so what they test is what this stage ships. Its first step
# creates the virtual environment without pip or setuptools, so it holds the service and its runtime
# dependencies only (the base image's pip installs into it through --python), and installs the pinned list
# alone, from wheels only (no compiler runs), so this layer is reused while only the code changes.
COPY scripts/install-runtime.sh ./scripts/
COPY constraints.txt ./
RUN bash scripts/install-runtime.sh dependencies /opt/attest-service constraints.txt

# The project is built into a wheel (setuptools lives in pip's isolated build environment, in this stage
# only); the wheel carries pinned_certs/ as the package's bundled pins. The script's second step installs it
# without dependencies and without an index, runs "pip check" (a dependency declared in pyproject.toml but
# missing from constraints.txt, or pinned at a version it does not accept, fails the build) and loads
# gunicorn's worker class, which needs what pip check cannot see: the requirements of gunicorn's extra.
COPY pyproject.toml README.md ./
COPY attest_service/ ./attest_service/
COPY pinned_certs/ ./pinned_certs/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && bash scripts/install-runtime.sh project /opt/attest-service /wheels


FROM ${PYTHON_IMAGE} AS runtime

# Bytecode was compiled at install time in the builder; a read-only root filesystem cannot take new .pyc files.
ENV PATH=/opt/attest-service/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ATTEST_PINNED_CERTS=/etc/attest-service/pinned_certs \
    ATTEST_NONCE_STORE=sqlite:////var/lib/attest-service/nonces.sqlite3 \
    ATTEST_LOG_FORMAT=json

# Installers and build back-ends of the base image go: the service never installs code at run time.
# A system account, UID/GID 10001 to match USER below and the chart's securityContext, with no home and
# no login shell; --no-log-init avoids a huge sparse lastlog file for a high UID.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
 && groupadd --system --gid 10001 attest \
 && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin attest \
 && install --directory --owner=10001 --group=10001 --mode=0750 /var/lib/attest-service

COPY --from=builder /opt/attest-service /opt/attest-service
# Owned by root and not writable by the service: pins change by replacing the mount, never from inside.
COPY pinned_certs/ /etc/attest-service/pinned_certs/

VOLUME ["/var/lib/attest-service"]

USER 10001:10001
WORKDIR /var/lib/attest-service
EXPOSE 8080

# gunicorn treats SIGTERM as a graceful shutdown: it stops accepting, lets workers finish their requests.
STOPSIGNAL SIGTERM

# No curl in the image: the standard library's http.client, which ignores proxy variables, asks /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import http.client as h; c = h.HTTPConnection('127.0.0.1', 8080, timeout=3); c.request('GET', '/healthz'); raise SystemExit(c.getresponse().status != 200)"]

ENTRYPOINT ["attest-service"]
CMD ["serve", "--bind", "0.0.0.0:8080"]
