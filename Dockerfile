# syntax=docker/dockerfile:1
# pullgate: the mirror (port 5000) and the admission webhook (port 8443) in one process.
#
#   docker build -t pullgate:0.1.0 --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
#   docker run --rm -p 5000:5000 -v pullgate-cache:/var/cache/pullgate pullgate:0.1.0
#
# Two stages: "build" turns the source into wheels (pullgate and every dependency), "runtime"
# installs them from a bind mount of the build stage — no compiler, pip cache, source tree or
# wheel files reach the final image. Pin the base by digest as well in your own pipeline
# (python:3.11.13-slim-bookworm@sha256:...) and let Renovate/Dependabot bump it.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Metadata first, so the dependency layer is cached while only the code changes.
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
# Must equal pyproject.toml's version: the install below pins it.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
# https://github.com/opencontainers/image-spec/blob/main/annotations.md
LABEL org.opencontainers.image.title="pullgate" \
      org.opencontainers.image.description="Pull-through caching mirror for OCI registries and Kubernetes image-policy admission webhook" \
      org.opencontainers.image.source="https://github.com/pullgate/pullgate" \
      org.opencontainers.image.url="https://github.com/pullgate/pullgate" \
      org.opencontainers.image.documentation="https://github.com/pullgate/pullgate/blob/main/docs/deploy.md" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="pullgate"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged UID/GID (Kubernetes runAsNonRoot needs a numeric USER to check).
RUN groupadd --system --gid 10001 pullgate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin pullgate \
 && install -d -o 10001 -g 10001 -m 0750 /var/cache/pullgate \
 && install -d -m 0755 /etc/pullgate

# Wheels are bind-mounted from the build stage (BuildKit), never copied into a layer;
# --no-index: nothing is fetched from the network at this point.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links /wheels "pullgate==${VERSION}" \
 && python -m pip uninstall --yes pip setuptools wheel \
 && rm -rf /root/.cache

USER 10001:10001
WORKDIR /var/cache/pullgate
VOLUME ["/var/cache/pullgate"]
# 5000: registry mirror, /healthz, /readyz, /metrics. 8443: admission webhook (HTTPS).
EXPOSE 5000/tcp 8443/tcp
STOPSIGNAL SIGTERM
# No curl in a slim image: the interpreter that is there anyway does the probe.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=2).status != 200)"]
# exec form: pullgate is PID 1 and gets SIGTERM itself (graceful drain, exit 0).
ENTRYPOINT ["pullgate", "serve"]
# Defaults for `docker run`; the Helm chart replaces them with --config /etc/pullgate/config.yaml.
CMD ["--listen", "0.0.0.0:5000", "--cache-dir", "/var/cache/pullgate"]
