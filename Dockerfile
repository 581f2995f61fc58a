# One Dockerfile, two images (docker compose builds both):
#   FLAVOR=cpu (default)  python:3.11-slim plus torch from pip: the API, the dashboard, CPU workers
#   FLAVOR=gpu            PyTorch's CUDA runtime image, torch already inside: GPU workers
# e.g. docker build --build-arg FLAVOR=gpu -t cbam-nas-gpu .
# For a small CPU image pass the CPU wheel index of your choice:
#   docker build --build-arg TORCH_INDEX_URL=<index> -t cbam-nas .
ARG FLAVOR=cpu
ARG CPU_IMAGE=python:3.11-slim
ARG GPU_IMAGE=pytorch/pytorch:2.8.0-cuda12.9-cudnn9-runtime

FROM ${CPU_IMAGE} AS base-cpu
ARG TORCH_SPEC="torch>=2.3 torchvision>=0.18"
ARG TORCH_INDEX_URL=""
# g++: CPU workers compile the CBAM CPU kernels on first use (search/nn/cbam_kernels.py).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
# The torch build is the builder's choice (TORCH_SPEC), hence no pin here.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ${TORCH_SPEC}

FROM ${GPU_IMAGE} AS base-gpu

# base-cpu or base-gpu: a stage of this file, not an image to tag.
# hadolint ignore=DL3006
FROM base-${FLAVOR} AS app
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CBAM_NAS_DATABASE_URL=sqlite:////var/lib/cbam-nas/cbam-nas.db \
    CBAM_NAS_ARTIFACTS_DIR=/var/lib/cbam-nas/artifacts \
    CBAM_NAS_DATA_DIR=/var/lib/cbam-nas/data
# The state directories exist in the image and belong to the app user, so that named volumes
# mounted on them start with that owner.
RUN groupadd --gid 10001 app \
    && useradd --create-home --uid 10001 --gid app app \
    && mkdir -p /var/lib/cbam-nas/artifacts /var/lib/cbam-nas/data /var/lib/cbam-nas/state \
    && chown -R 10001:10001 /var/lib/cbam-nas
WORKDIR /opt/cbam-nas
COPY pyproject.toml README.md ./
COPY search search
COPY workers workers
COPY service service
# The project itself (with the gRPC proxy extra), not a package from an index.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[proxy]" && rm -rf build ./*.egg-info
USER 10001:10001
WORKDIR /var/lib/cbam-nas
EXPOSE 8000
CMD ["cbam-nas", "serve", "--host", "0.0.0.0"]
