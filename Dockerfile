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

ENV MODULESERVE_DB=sqlite:////data/registry.db \
    MODULESERVE_STORE=/data/store
VOLUME /data
EXPOSE 8001 8002
CMD ["moduleserve-server", "--host", "0.0.0.0"]
