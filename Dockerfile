# syntax=docker/dockerfile:1
#
# coc-change-worker: `docker build -t coc-change-worker:0.1.0 .`
#
# Two stages. `build` installs the pinned runtime dependencies (requirements.lock, wheels only)
# and the project into a self-contained virtualenv at /opt/venv; the final stage copies only that
# venv onto the same slim base, so no installer, build backend or test extra is shipped.
# tests/test_dockerfile.py runs hadolint on this file and replays the `build` stage's COPY/RUN
# steps in a fresh venv: keep every install step a plain `RUN` in that stage.

FROM python:3.11.15-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Dependencies first, so editing the source does not invalidate this layer.
COPY requirements.lock requirements-build.lock ./
RUN python -m pip install --no-deps --only-binary=:all: -r requirements-build.lock \
    && python -m venv --without-pip /opt/venv \
    && python -m pip --python /opt/venv/bin/python install --no-deps --only-binary=:all: -r requirements.lock

COPY pyproject.toml README.md ./
COPY worker ./worker
COPY schemas ./schemas
RUN python -m pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
    && python -m pip --python /opt/venv/bin/python install --no-deps /tmp/wheels/coc_change_worker-*.whl \
    && python -m pip --python /opt/venv/bin/python check


FROM python:3.11.15-slim-bookworm

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=https://example.invalid/coc-change-worker

LABEL org.opencontainers.image.title="coc-change-worker" \
      org.opencontainers.image.description="Kafka worker that applies change events to the COC change-ticket API and publishes one outcome per event." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.15-slim-bookworm"

# The base image's own installer is not needed at run time; the app's venv has none either.
# /data is the only writable path the worker needs (the sqlite dedup file); it is owned by the
# unprivileged user, so the root filesystem can be mounted read-only.
RUN python -m pip uninstall --no-cache-dir --yes pip setuptools wheel \
    && groupadd --system --gid 10001 coc \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin coc \
    && install -d -o 10001 -g 10001 -m 0750 /data

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    COC_WORKER_DEDUP_URL=sqlite:////data/dedup.sqlite3 \
    COC_WORKER_HTTP_PORT=8080

WORKDIR /data
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM

# The check connects where the worker listens: a wildcard host (COC_WORKER_HTTP_HOST unset, 0.0.0.0
# or ::) through its loopback, 127.0.0.1 or ::1 (the worker's "::" socket is IPv6-only: 127.0.0.1 is
# refused there), any other host directly. tests/test_dockerfile.py runs this command.
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; h = os.environ.get('COC_WORKER_HTTP_HOST', ''); h = ('[::1]' if ':' in h else '127.0.0.1') if not h.strip('0.:') else '[' + h + ']' if ':' in h else h; urllib.request.urlopen('http://' + h + ':' + os.environ.get('COC_WORKER_HTTP_PORT', '8080') + '/healthz', timeout=2)"]

ENTRYPOINT ["coc-worker"]
CMD ["run"]
