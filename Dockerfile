# syntax=docker/dockerfile:1
#
# Images for the cluster (charts/gnr, k8s/). `make image` builds the default, last stage:
#   gnr            CUDA PyTorch + gnr, non-root, entrypoint `gnr` (the training and evaluation pods)
# and `docker build --target mlflow-server -t gnr-mlflow:<version> .` the other:
#   mlflow-server  the MLflow tracking server of k8s/ (PostgreSQL + S3 clients), same MLflow as gnr

# The base image brings torch and CUDA: by default PyTorch's own CUDA runtime image (torch 2.14.1,
# CUDA 12.8, cuDNN 9), or your cluster's image with --build-arg BASE_IMAGE=... Any base whose torch is
# within pyproject.toml's range (torch>=2.11,<2.15) works: gnr is installed beside that torch, never
# over it (tools/image_constraints.py), and a torch out of range fails the build.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.8-cudnn9-runtime
ARG PYTHON_IMAGE=python:3.11-slim


FROM ${PYTHON_IMAGE} AS mlflow-server
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY requirements.lock /tmp/
RUN pip install -c /tmp/requirements.lock mlflow boto3 "psycopg2-binary==2.9.13" \
 && rm /tmp/requirements.lock \
 && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin mlflow
USER 1000:1000
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host=0.0.0.0", "--port=5000"]


FROM ${BASE_IMAGE} AS gnr
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Dependencies first (a layer that survives code changes), then gnr itself without them. They are
# installed at requirements.lock's versions, except torch, torchvision and the CUDA libraries, which
# stay the base's. nvidia-ml-py (pynvml) gives MLflow's system metrics the GPUs' utilisation and
# memory. GNR_EXTRAS (e.g. gcs,azure) adds the optional object-store clients for gs:// and az:// data.
WORKDIR /opt/gnr
COPY pyproject.toml README.md requirements.lock tools/image_constraints.py ./
ARG GNR_EXTRAS=""
RUN GNR_EXTRAS="${GNR_EXTRAS}" python -c 'import os, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
extras = [e for e in os.environ["GNR_EXTRAS"].split(",") if e]; \
print("\n".join(p["dependencies"] + [d for e in extras for d in p["optional-dependencies"][e]]))' \
      > /tmp/requirements.txt \
 && python image_constraints.py requirements.lock > /tmp/constraints.txt \
 && pip install -r /tmp/requirements.txt -c /tmp/constraints.txt "nvidia-ml-py==13.615.71" \
 && rm /tmp/requirements.txt /tmp/constraints.txt image_constraints.py
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
