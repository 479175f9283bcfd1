# syntax=docker/dockerfile:1
# seqserve images, one Dockerfile, three targets:
#   runtime (default)  docker build -t seqserve .                     seqserve[server], CPU, no TensorFlow
#   gpu                docker build --target gpu -t seqserve:gpu .    seqserve[gpu] on a CUDA runtime base
#   export             docker build --target export -t seqserve-export .   seqserve[export] (TensorFlow)
# The server images run as uid 10001, serve the bundled models (basicmotions, the default, and
# japanesevowels) unless SEQSERVE_MODEL_REPOSITORY names a mounted model repository
# (/models/<model>/<version>/) or SEQSERVE_MODEL_DIR one model directory, and answer their
# healthcheck with grpc.health.v1.
ARG PYTHON_IMAGE=python:3.11-slim
# onnxruntime-gpu wheels on PyPI are built for CUDA 12 and cuDNN 9.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# --- the seqserve wheel (pure Python; the bundled models are package data) -----------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto proto
COPY server server
COPY client client
COPY export export
COPY models models
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- seqserve[server] in a virtualenv, copied whole into the runtime image ----------------------
FROM ${PYTHON_IMAGE} AS server-venv
COPY --from=wheel /wheels /wheels
RUN python -m venv /opt/seqserve \
    && /opt/seqserve/bin/pip install --no-cache-dir --find-links /wheels "seqserve[server]"

# --- export: train / convert job (TensorFlow); writes model directories under /models ------------
FROM ${PYTHON_IMAGE} AS export
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir --find-links /wheels "seqserve[export]" && rm -rf /wheels \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin seqserve \
    && mkdir -p /models && chown seqserve /models
USER 10001
WORKDIR /models
ENV PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
ENTRYPOINT ["seqserve-export"]
CMD ["--help"]

# --- gpu: onnxruntime-gpu on a CUDA runtime base; serves with --device cuda ----------------------
# Needs the NVIDIA Container Toolkit on the host: docker run --gpus all seqserve:gpu
FROM ${CUDA_IMAGE} AS gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
RUN python3 -m venv /opt/seqserve \
    && /opt/seqserve/bin/pip install --no-cache-dir --find-links /wheels "seqserve[gpu]" \
    && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin seqserve \
    && mkdir -p /var/lib/seqserve /models && chown seqserve /var/lib/seqserve /models
USER 10001
ENV PATH=/opt/seqserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SEQSERVE_HOST=0.0.0.0 \
    SEQSERVE_PORT=50051 \
    SEQSERVE_METRICS_PORT=8081 \
    SEQSERVE_HTTP_PORT=8000 \
    SEQSERVE_MODEL_DIR="" \
    SEQSERVE_MODEL_REPOSITORY="" \
    SEQSERVE_SNAPSHOT_PATH=/var/lib/seqserve/sessions.npz \
    SEQSERVE_DEVICE=cuda
EXPOSE 50051 8000 8081
# seqserve health exits 1 (not SERVING: starting, draining) or 2 (unreachable); docker reserves 2.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD seqserve --target "127.0.0.1:${SEQSERVE_PORT}" --timeout 3 health || exit 1
ENTRYPOINT ["seqserve-server"]
CMD []

# --- runtime (default target): seqserve[server] on CPU ------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
COPY --from=server-venv /opt/seqserve /opt/seqserve
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin seqserve \
    && mkdir -p /var/lib/seqserve /models && chown seqserve /var/lib/seqserve /models
USER 10001
ENV PATH=/opt/seqserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SEQSERVE_HOST=0.0.0.0 \
    SEQSERVE_PORT=50051 \
    SEQSERVE_METRICS_PORT=8081 \
    SEQSERVE_HTTP_PORT=8000 \
    SEQSERVE_MODEL_DIR="" \
    SEQSERVE_MODEL_REPOSITORY="" \
    SEQSERVE_SNAPSHOT_PATH=/var/lib/seqserve/sessions.npz
EXPOSE 50051 8000 8081
# seqserve health exits 1 (not SERVING: starting, draining) or 2 (unreachable); docker reserves 2.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD seqserve --target "127.0.0.1:${SEQSERVE_PORT}" --timeout 3 health || exit 1
ENTRYPOINT ["seqserve-server"]
CMD []
