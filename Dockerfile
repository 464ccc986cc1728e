# The fusion gateway: gunicorn serving gateway.asgi:app on port 5000, as an unprivileged user.
#
#   scripts/image.sh build                    # `make image`: podman, with a base made here
#   docker build -t fusion-gateway .          # from python:3.12-slim
#   podman run -p 5000:5000 -e GATEWAY_RECOMMENDERS='[{"name": "sml", "url": "http://sml:5001/test"}]' fusion-gateway
#   podman run fusion-gateway python -m mock_recommenders --host 0.0.0.0   # the mocks, same image
#
# Set at run time, in the environment:
#   GATEWAY_*           the gateway's settings (gateway/config/settings.py; the defaults are in
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
# uv, from the hashes the host's `make install` uses (scripts/uv-requirements.txt); then the
# application from uv.lock, the same lock: the build resolves nothing of its own.
# `python3`: Debian's own Python has no `python` command.
COPY scripts/uv-requirements.txt /tmp/uv-requirements.txt
# Behind a proxy that inspects TLS, scripts/image.sh lends the host's CA bundle as a secret:
# only these steps see it, and no layer keeps it. Without it, pip and uv trust their own CAs.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --quiet --require-hashes -r /tmp/uv-requirements.txt
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY gateway gateway
COPY mock_recommenders mock_recommenders
# The runtime with two extras, in /opt/venv, where the final stage runs it:
# - `tracing` (OpenTelemetry), so that OTEL_EXPORTER_OTLP_ENDPOINT switches tracing on in a
#   running image; unset, it is never imported;
# - `mocks` (numpy), which the mock recommenders need and the gateway never imports.
# --locked: a uv.lock that does not match pyproject.toml stops the build. --no-editable: the
# project is installed as a wheel, not pointing back at /src. uv gives the venv no pip.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export SSL_CERT_FILE=/run/secrets/pip_cert; fi \
    && UV_PROJECT_ENVIRONMENT=/opt/venv UV_PYTHON=python3 UV_PYTHON_DOWNLOADS=never \
       UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 \
       /opt/uv/bin/uv sync --quiet --locked --no-editable --extra mocks --extra tracing
# buildah 1.28 (Debian 12's podman) hands the next stage this one as it was before its last
# step, when that step is a RUN --mount taken from the cache; a step after it avoids that.
WORKDIR /opt/venv

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="fusion-gateway" \
      org.opencontainers.image.description="A fusion gateway for model recommenders; also runs the mock recommenders (python -m mock_recommenders)"

# The environment alone (same base, same path): not uv, not the sources, not pip's or uv's
# caches. COPY is keyed by what it copies, so a changed source always makes a new layer.
COPY --from=build /opt/venv /opt/venv

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
