# syntax=docker/dockerfile:1
# The ddpm-sweep image: docker-compose.yml runs its MLflow server, Ray head and Ray workers from it.
#
#   docker build -t ddpm-sweep .        # torch from PyPI: the CUDA build on x86_64 Linux
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t ddpm-sweep .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t ddpm-sweep:cpu .
FROM python:3.11-slim

# torch is installed first and pinned, as scripts/setup.sh does: the package's torch range is then
# already satisfied, so pip keeps the build chosen here.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
# Every node of a Ray cluster (and a client joining it) must run the same Ray and Python versions.
ARG RAY_VERSION=2.60.0
ARG MLFLOW_VERSION=3.17.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

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
