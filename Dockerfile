# syntax=docker/dockerfile:1
#
# One image for the four services (and `wecombot setup`):
#
#   docker build -t wecombot:0.1.0 .
#   docker run --rm wecombot:0.1.0 --help           # the entrypoint is `wecombot` (under dumb-init)
#   docker run --rm --env-file .env wecombot:0.1.0 gateway
#
# No default command: each Kubernetes Deployment passes its subcommand
# (args: ["gateway"|"llm"|"sender"|"token"], the setup Job ["setup"]). See docs/deploy.md.
#
# Pin the base by digest in your CI for reproducible builds, e.g.
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- builder: wheels + venv
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Only what the wheel is built from (.dockerignore keeps the rest, .env included, out).
COPY requirements.lock pyproject.toml README.md ./
COPY libs/ libs/
COPY services/ services/

# A self-contained virtualenv that the final stage copies as it is: the dependencies
# exactly as locked (requirements.lock: every version pinned, every file's sha256
# checked; `make lock` writes it and the tests run the same versions), then the
# project's own wheel without resolving anything, and `pip check` that the lock holds
# all it needs.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock \
 && python -m pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-index --no-deps /wheels/wecombot-*.whl \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip uninstall --yes pip \
 && /opt/venv/bin/wecombot --help > /dev/null \
 && /opt/venv/bin/dumb-init --version

# ---------------------------------------------------------------- runtime: no build tools
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="wecombot" \
      org.opencontainers.image.description="Event-sourced WeCom ↔ LLM bridge over NATS JetStream" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LOG_FORMAT=json

# An unprivileged user with fixed ids (Kubernetes: runAsUser/runAsGroup 10001).
RUN groupadd --system --gid 10001 wecombot \
 && useradd --system --uid 10001 --gid wecombot --home-dir /home/wecombot --create-home \
        --shell /usr/sbin/nologin wecombot

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/wecombot

# gateway (callback + /healthz + /readyz), then the health ports of llm, sender, token.
EXPOSE 8080 8081 8082 8083

# dumb-init is PID 1 and passes signals on to `wecombot`: Python as PID 1 ignores a SIGTERM
# that comes before it has set its handler (the kernel drops a signal PID 1 does not
# handle), so a pod deleted in its first second waited out its whole grace period.
ENTRYPOINT ["dumb-init", "--", "wecombot"]
