# moduleserve server image: the registry CLI, the server and the client CLI.
FROM python:3.11-slim

# Set to a CPU-only wheel index to keep the image small; empty uses the default index.
ARG TORCH_INDEX_URL=""
WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY client client
COPY registry registry
COPY server server
# torch first, pinned, so that nothing else picks its version.
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0 \
 && pip install --no-cache-dir -c constraints.txt '.[server]'

# Shutdown grace below `docker stop`'s 10 s, so in-flight requests finish before SIGKILL.
ENV MODULESERVE_DB=sqlite:////data/registry.db \
    MODULESERVE_STORE=/data/store \
    MODULESERVE_SHUTDOWN_GRACE_S=8 \
    PYTHONPATH=/models
VOLUME /data
EXPOSE 8001 8002
# `docker run` alone migrates (creates) the registry in /data, then serves it; without a
# token (-e MODULESERVE_TOKENS='["…"]') the server refuses 0.0.0.0 and says so.
CMD ["sh", "-c", "moduleserve-registry init && exec moduleserve-server --host 0.0.0.0"]
