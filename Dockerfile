# syntax=docker/dockerfile:1
# The ddpm-sweep image: docker-compose.yml runs its MLflow server, Ray head and Ray workers from it.
#
#   docker build -t ddpm-sweep .                                  # torch's CUDA 12.8 build
#   docker build --build-arg TORCH_CUDA=cu126 -t ddpm-sweep .
#   docker build --build-arg TORCH_CUDA=cpu -t ddpm-sweep:cpu .    # no GPU, a much smaller image
FROM python:3.11-slim

# torch is installed first and pinned, as scripts/setup.sh does: the package's torch range is then
# already satisfied, so pip keeps the build chosen here.
ARG TORCH_SPEC="torch==2.13.0"
# The torch build, and with it the host driver the GPU workers need. TORCH_CUDA names a PyTorch
# wheel index, https://download.pytorch.org/whl/${TORCH_CUDA}; TORCH_INDEX_URL, if set, is used
# instead (a mirror, ROCm). NVIDIA's minimum Linux driver per build (CUDA compatibility guide,
# toolkit release notes):
#   cu126, cu128 (CUDA 12.x): >= 525.60.13, through CUDA minor version compatibility, which runs
#     "with limited feature-set" below the driver the toolkit shipped with (R560 for 12.6, R570
#     for 12.8; e.g. no JIT compilation of PTX newer than the driver); the full set from there on.
#   cu130 (CUDA 13.x): >= 580. PyPI's torch==2.13.0 on x86_64 Linux is this build.
#   cpu: no driver; torch.cuda.is_available() is False.
# The driver must also support the GPU itself (Blackwell: R570 or newer). The default, cu128, is
# the oldest build with Blackwell kernels as well as Hopper's (H100, H200), and runs on the R535
# and R550 drivers a cu130 build cannot use. On a driver older than its build needs, torch sees no
# GPU and trials train on the CPU: the image records its build (ENV and LABEL below).
ARG TORCH_CUDA=cu128
ARG TORCH_INDEX_URL=""
# Every node of a Ray cluster (and a client joining it) must run the same Ray and Python versions.
ARG RAY_VERSION=2.60.0
ARG MLFLOW_VERSION=3.17.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A C compiler: `compile: true` (torch.compile; sweeps/cifar10_gpu.yaml) has Triton build its
# launcher with one at run time, and the slim image has none.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# The build chosen, for `docker inspect` and for an error that has to name it at run time.
ENV DDPM_SWEEP_TORCH_CUDA=${TORCH_CUDA} \
    DDPM_SWEEP_TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/${TORCH_CUDA}}
LABEL ddpm-sweep.torch-spec="${TORCH_SPEC}" \
      ddpm-sweep.torch-cuda="${TORCH_CUDA}" \
      ddpm-sweep.torch-index-url="${DDPM_SWEEP_TORCH_INDEX_URL}"

# The index's build is checked, not trusted: a .../cpu or .../cuNNN index must have installed a
# torch of that build (any other index, e.g. a mirror, is not checked).
RUN pip install --index-url "$DDPM_SWEEP_TORCH_INDEX_URL" "$TORCH_SPEC" \
 && python -c 'import re, sys, torch; \
        want = sys.argv[1].rstrip("/").rsplit("/", 1)[-1]; \
        got = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"; \
        ok = got == want or not re.fullmatch(r"cpu|cu[0-9]+", want); \
        sys.exit(None if ok else f"torch {torch.__version__} is a {got} build, not {want}")' \
        "$DDPM_SWEEP_TORCH_INDEX_URL"

WORKDIR /app

# The dependencies, in a layer of their own so that editing the code does not reinstall them:
# the package's dependencies (read from pyproject.toml), ray[default] for the dashboard and job
# API (port 8265), ray[client] for the client server (port 10001), mlflow[auth] for the optional
# basic auth (docker/mlflow-basic-auth.yml), and psycopg2-binary, MLflow's PostgreSQL driver
# (the image needs these, the package does not, so they are not in pyproject.toml).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
        "ray[default,client,tune]==${RAY_VERSION}" "mlflow[auth]==${MLFLOW_VERSION}" \
        "psycopg2-binary>=2.9" \
 && rm /tmp/requirements.txt

COPY README.md ./
COPY lightning_modules/ lightning_modules/
COPY orchestrator/ orchestrator/
RUN pip install --no-deps . && rm -rf build ./*.egg-info
COPY sweeps/ sweeps/

# A non-root user. The mount points exist in the image, owned by that user, so that new named
# volumes mounted there start out writable by it.
RUN useradd --create-home --uid 1000 --shell /bin/bash ddpm \
 && mkdir -p /shared/ddpm_sweep_runs /mlflow/artifacts /mlflow/auth /data \
 && chown -R ddpm:ddpm /app /shared /mlflow
USER ddpm

CMD ["ddpm-sweep", "--help"]
