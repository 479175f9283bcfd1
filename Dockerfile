# Runtime image: seqserve[server] only (no TensorFlow), bundled default model, non-root.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto proto
COPY server server
COPY client client
COPY export export
COPY models models
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[server]"

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 seqserve && mkdir -p /var/lib/seqserve \
    && chown seqserve /var/lib/seqserve
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "seqserve[server]" && rm -rf /wheels
USER seqserve
ENV SEQSERVE_SNAPSHOT_PATH=/var/lib/seqserve/sessions.npz
EXPOSE 50051 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD ["seqserve", "--target", "127.0.0.1:50051", "health"]
ENTRYPOINT ["seqserve-server"]
