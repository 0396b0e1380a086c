# syntax=docker/dockerfile:1
#
# Images for the cluster (charts/gnr, k8s/). `make image` builds the default, last stage:
#   gnr            CUDA PyTorch + gnr, non-root, entrypoint `gnr` (the training and evaluation pods)
# and `docker build --target mlflow-server -t gnr-mlflow:<version> .` the other:
#   mlflow-server  the MLflow tracking server of k8s/ (PostgreSQL + S3 clients), same MLflow as gnr

# The base's torch must be the version pyproject.toml pins, or pip installs a second copy.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.8-cudnn9-runtime
ARG PYTHON_IMAGE=python:3.11-slim


FROM ${PYTHON_IMAGE} AS mlflow-server
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN pip install "mlflow==3.17.2" "psycopg2-binary==2.9.13" "boto3==1.44.5" \
 && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin mlflow
USER 1000:1000
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host=0.0.0.0", "--port=5000"]


FROM ${BASE_IMAGE} AS gnr
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Dependencies first (a layer that survives code changes), then gnr itself without them. nvidia-ml-py
# (pynvml) gives MLflow's system metrics the GPUs' utilisation and memory.
WORKDIR /opt/gnr
COPY pyproject.toml README.md ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt "nvidia-ml-py==13.615.71" \
 && rm /tmp/requirements.txt
COPY gnr ./gnr
COPY cli ./cli
COPY charts/gnr ./charts/gnr
RUN pip install --no-deps . && rm -rf build ./*.egg-info
# uid 1000 (the chart's runAsUser); a base image may already have one (e.g. ubuntu), which gives way.
RUN if getent passwd 1000 >/dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; fi \
 && if getent group 1000 >/dev/null; then groupdel "$(getent group 1000 | cut -d: -f1)"; fi \
 && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin gnr
USER 1000:1000
ENV HOME=/home/gnr GNR_HOME=/home/gnr/.gnr
WORKDIR /home/gnr
ENTRYPOINT ["gnr"]
CMD ["--help"]
