# One image for the KFP components (their `base_image`) and the KServe predictor.
#
# CPU (default; torch from the PyTorch CPU wheel index, no CUDA packages):
#   docker build -t ghcr.io/fineserve/fineserve:0.1.0 .
#
# CUDA: the PyPI torch wheel brings the CUDA user-space libraries as pip packages, so a small
# CUDA "base" image is enough (it carries the NVIDIA container-runtime settings). Bases without
# python3, such as nvidia/cuda, get the distro's python3 from apt below.
#   docker build -t ghcr.io/fineserve/fineserve:0.1.0-cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#
# Runtime contract:
#   * ENTRYPOINT is the predictor; KServe passes `--model_name=... --model_dir=/mnt/models` as
#     args, KFP components replace the command with their own `sh -c ... python3 ...`.
#   * runs as UID 10001 with primary group 0; everything the process may write (HOME, HF_HOME)
#     is group-0 writable, so an arbitrary UID (OpenShift restricted SCC) works too.
#   * the venv is read-only for that user but made with --system-site-packages, so the user site
#     (~/.local) is enabled: KFP's runtime `pip install kfp==...` lands there instead of failing.

ARG BASE_IMAGE=python:3.11.13-slim-bookworm

FROM ${BASE_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# The python3 packages follow the distro of the pinned base tag; apt cannot pin one version
# across Debian and Ubuntu bases, and python slim bases never reach this branch.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv --system-site-packages /opt/venv

# torch first and from its own index: the CPU index has no CUDA wheels, so the default image
# does not pull GBs of nvidia-* packages. Its own layer survives dependency changes.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src

# Dependencies only (from pyproject.toml), so source edits do not reinstall them; the torch
# constraint makes a resolver conflict fail the build rather than swap in another torch.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > requirements.txt \
    && echo "torch==${TORCH_VERSION}" > constraints.txt \
    && pip install --no-cache-dir -r requirements.txt -c constraints.txt

# README.md is pyproject's long description. The glob keeps the build working while it does not
# exist (setuptools only warns); pyproject.toml beside it keeps one match for every builder.
COPY README.md* pyproject.toml ./
COPY fineserve ./fineserve
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
RUN pip install --no-cache-dir --no-deps . \
    && python3 -c "import fineserve.components, fineserve.pipelines, fineserve.serving"


FROM ${BASE_IMAGE} AS runtime

ARG APP_UID=10001

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# g++ (and Python's headers): the predictor's `--compile` has torch.compile build its C++
# kernels at load (auto: bfloat16 on a CPU; `on` on a GPU too). python slim bases carry the
# headers; bases without python3 get the distro's python3 and python3-dev.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && if ! command -v python3 >/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-dev; \
    fi \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid "${APP_UID}" --gid 0 --create-home --home-dir /home/fineserve \
        --shell /bin/bash fineserve \
    && mkdir -p /home/fineserve/.cache/huggingface \
    && chown -R "${APP_UID}:0" /home/fineserve \
    && chmod -R g=u /home/fineserve

COPY --from=builder /opt/venv /opt/venv

# HOME is set explicitly: an arbitrary UID has no passwd entry. USER likewise, for
# getpass.getuser() (MLflow tags runs with it and raises KeyError without a passwd entry).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/fineserve \
    USER=fineserve \
    HF_HOME=/home/fineserve/.cache/huggingface \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /home/fineserve

# Numeric, so Kubernetes can enforce runAsNonRoot against the image's user.
USER ${APP_UID}:0

# KServe predictor: HTTP (REST v1/v2) and gRPC.
EXPOSE 8080 8081

# For `docker run`; Kubernetes ignores it and uses the probes in manifests/.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/live', timeout=4)"]

ENTRYPOINT ["python", "-m", "fineserve.serving"]
CMD ["--model_name=fineserve", "--model_dir=/mnt/models"]
