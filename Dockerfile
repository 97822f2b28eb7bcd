# syntax=docker/dockerfile:1
#
# The VoxVault production image. One image runs every role; the command picks it:
#   voxvault serve --host 0.0.0.0 --port 8000   the HTTP API (the default command)
#   voxvault worker --concurrency 1             pipeline workers without the API
#   voxvault migrate                            bring the database schema up to date, then exit
#
#   docker build -t voxvault .                  CPU image (the default target)
#   docker build -t voxvault-gpu --target gpu . CUDA libraries added for GPU workers
#
# docs/deploy.md explains the settings, the compose stack and how to scale it.

# ---- build: the package and its dependencies in a virtual environment ---------------------------
FROM python:3.11-slim AS build

# Every scale-out backend's extra, so that one image serves any deployment: PostgreSQL (metadata
# and jobs), S3-compatible object storage (blobs), Redis (progress events).
ARG INSTALL_EXTRAS=postgres,s3,redis

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/voxvault
WORKDIR /src

# Dependencies first, in a layer of their own that only a change of pyproject.toml (or the README
# it names) rebuilds: they are hundreds of MB (the speech engine, the bundled tiny.en model,
# PyAV with its own FFmpeg), the package itself is small.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p src/voxvault && touch src/voxvault/__init__.py \
    && /opt/voxvault/bin/pip install ".[${INSTALL_EXTRAS}]"

COPY src ./src
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/voxvault/bin/pip install --no-deps --force-reinstall . \
    && /opt/voxvault/bin/voxvault --help > /dev/null

# ---- base: what every runtime image shares --------------------------------------------------------
FROM python:3.11-slim AS base

# No FFmpeg or codec packages: PyAV's wheels carry their own FFmpeg (libopus included), and the
# speech engine's wheels carry their own libraries. tini runs as PID 1 so that SIGTERM reaches
# voxvault (a PID 1 without a handler ignores it, and `docker stop` would wait out its grace
# period) and so that orphaned decoder processes are reaped.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 voxvault \
    && useradd --system --uid 10001 --gid voxvault --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin voxvault \
    && mkdir /data \
    && chown voxvault:voxvault /data

COPY --from=build /opt/voxvault /opt/voxvault

# /data holds the embedded backends' files when no database or blob URL is set, the signing key
# when VOXVAULT_SECRET_KEY is not, a worker's scratch files while it runs a job, and models other
# than the bundled tiny.en once downloaded (HF_HOME).
ENV PATH=/opt/voxvault/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VOXVAULT_DATA_DIR=/data \
    HF_HOME=/data/huggingface

USER voxvault
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000

# Liveness of the API on the default command's port; worker and migrate containers have no HTTP
# server and turn it off (compose.yaml does; `docker run --no-healthcheck` otherwise).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["voxvault", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---- gpu: the runtime plus the CUDA libraries the speech engine loads on a GPU ------------------
# CTranslate2's wheels are built for CUDA 12 with cuDNN 9 and find those libraries at run time;
# the host needs an NVIDIA driver and the NVIDIA Container Toolkit (docs/deploy.md, GPU workers).
FROM base AS gpu
USER root
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/voxvault/bin/pip install --disable-pip-version-check --root-user-action=ignore \
        "nvidia-cublas-cu12" "nvidia-cudnn-cu12==9.*"
ENV LD_LIBRARY_PATH=/opt/voxvault/lib/python3.11/site-packages/nvidia/cublas/lib:/opt/voxvault/lib/python3.11/site-packages/nvidia/cudnn/lib \
    VOXVAULT_WHISPER_DEVICE=cuda
USER voxvault

# ---- runtime: the default target ------------------------------------------------------------------
FROM base AS runtime
