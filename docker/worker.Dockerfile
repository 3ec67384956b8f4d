# A GPU worker (one per GPU). Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t moments-worker .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH
WORKDIR /app
# CUDA build of torch (cu128), then Moments with the worker and AWQ extras.
RUN pip install --no-cache-dir torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md ./
COPY moments ./moments
COPY service ./service
COPY workers ./workers
COPY tools ./tools
COPY protos ./protos
RUN pip install --no-cache-dir ".[worker,awq]"
ENV MOMENTS_DATA_DIR=/data \
    MOMENTS_DEVICE=cuda \
    HF_HOME=/models
VOLUME ["/data", "/models"]
CMD ["moments", "worker"]
