# The fusion gateway: gunicorn serving gateway.asgi:app on port 5000, as an unprivileged user.
#
#   scripts/image.sh build                    # `make image`: podman, with a base made here
#   docker build -t fusion-gateway .          # from python:3.12-slim
#   podman run -p 5000:5000 -e GATEWAY_RECOMMENDERS='[{"name": "sml", "url": "http://sml:5001/test"}]' fusion-gateway
#   podman run fusion-gateway python -m mock_recommenders --host 0.0.0.0   # the mocks, same image
#
# Set at run time, in the environment:
#   GATEWAY_*           the gateway's settings (gateway/config.py; the defaults are in
#                       gateway/config.yaml): GATEWAY_RECOMMENDERS (a JSON list of {name, url}),
#                       GATEWAY_DEADLINE_MS, ...; GATEWAY_CONFIG names a YAML file that replaces
#                       the packaged one. A GATEWAY_ variable that is no setting stops start-up.
#   WEB_CONCURRENCY     gunicorn's workers. The default is the number of CPUs the container
#                       sees, which is all of the host's whatever its CPU limit: set it to that.
#   GUNICORN_CMD_ARGS   more gunicorn flags: "--access-logfile -", "--graceful-timeout 20".
#                       It cannot move the port (the command's --bind wins): map the port
#                       instead (-p 8080:5000), or give the whole command with another --bind,
#                       and then a health check that asks that port.
#
# Stopping: SIGTERM (`podman stop`) reaches gunicorn, PID 1 (no shell in between), which lets
# the requests in flight finish (for up to its graceful_timeout, 30 s) and exits 0. podman and
# docker send SIGKILL 10 s after SIGTERM unless told otherwise (--stop-timeout, compose's
# stop_grace_period, Kubernetes' terminationGracePeriodSeconds).

# Any Debian-like image with python3 (3.11+) and its venv module: scripts/image.sh passes a
# Debian bookworm made with debootstrap, whose python3 is Debian's 3.11 in /usr/bin.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
# `python3`: Debian's own Python has no `python` command.
RUN python3 -m venv /opt/build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY mock_recommenders mock_recommenders
# Behind a proxy that inspects TLS, scripts/image.sh lends the host's CA bundle as a secret:
# only this step sees it, and no layer keeps it. Without it, pip trusts its own CAs.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/build/bin/pip wheel --wheel-dir /wheels '.[mocks,tracing]'
# What the wheels were built from, as one digest: the next stage copies it (below) so that its
# install step is built anew whenever the source changes.
RUN find /src -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum > /source.sha256
# buildah 1.28 (Debian 12's podman) hands the next stage this one as it was before its last
# step, when that step is a RUN --mount taken from the cache; a step after it avoids that.
WORKDIR /wheels

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="fusion-gateway" \
      org.opencontainers.image.description="A fusion gateway for model recommenders; also runs the mock recommenders (python -m mock_recommenders)"

# A mounted stage is no part of a step's cache key (buildah): without this copy, a cached
# install step kept the wheels of an older source, and the image its old code.
COPY --from=build /source.sha256 /opt/source.sha256

# With OpenTelemetry (the `tracing` extra), so that OTEL_EXPORTER_OTLP_ENDPOINT switches tracing
# on in a running image; unset, it is never imported.
# With numpy (the `mocks` extra), which the mock recommenders need and the gateway never imports.
# The wheels, and the pip that installs them, are mounted from the build stage, not copied:
# no layer of this image holds them, and the venv has no pip (nor setuptools) of its own.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,from=build,source=/opt/build,target=/opt/build \
    python3 -m venv --without-pip /opt/venv \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --no-cache-dir --no-index \
        --find-links /wheels 'fusion-gateway[mocks,tracing]'

# A fixed uid, so that volumes and Kubernetes' runAsUser/runAsNonRoot can rely on it. The
# metrics directory is the user's, and writable by all as /tmp is, because runc gives a tmpfs
# mounted over it this directory's mode but not its owner.
RUN groupadd --gid 10001 gateway \
    && useradd --uid 10001 --gid 10001 --home-dir /app --no-create-home \
               --shell /usr/sbin/nologin gateway \
    && mkdir -p /run/gateway/metrics \
    && chown gateway:gateway /run/gateway/metrics \
    && chmod 1777 /run/gateway/metrics

WORKDIR /app
COPY gunicorn.conf.py ./

# PROMETHEUS_MULTIPROC_DIR: where every worker writes its metrics, which /metrics merges; it
# is made here for the user, and is best a tmpfs (compose's `tmpfs:`, an emptyDir with
# medium: Memory), mounted over it. gunicorn.conf.py removes a previous run's files at start.
# PYTHONUNBUFFERED: log lines reach `podman logs` as they are written.
# XDG_RUNTIME_DIR: where gunicorn (25+) puts its control socket, for `gunicornc`; its default,
# under $HOME, is not writable here, and /tmp is however the container runs (read-only root
# filesystems get a tmpfs or a volume there).
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PROMETHEUS_MULTIPROC_DIR=/run/gateway/metrics \
    PYTHONUNBUFFERED=1 \
    XDG_RUNTIME_DIR=/tmp

USER 10001:10001
EXPOSE 5000

# Liveness; python, as slim images have no curl. (A container that runs the mocks instead
# has no /healthz on 5000: run it with --no-healthcheck, or its own check.)
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=2)"]

# A command, no entrypoint, so that `podman run IMAGE python -m mock_recommenders` runs the
# mocks; exec form, so that gunicorn is PID 1 and gets SIGTERM itself.
CMD ["gunicorn", "-c", "/app/gunicorn.conf.py", "--bind", "0.0.0.0:5000", "gateway.asgi:app"]
