# A GPU worker (one per GPU), on NVIDIA's CUDA runtime image. Needs that base image (a registry that
# serves nvidia/cuda, or `docker load` of it) and, to run, the NVIDIA container toolkit; docker/README.md
# says how. Not built on the machines this project is made on (no registry, no GPU). From the
# repository root:
#   docker build --network host -f docker/worker.Dockerfile -t moments-worker .
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_BASE}
# torch's CUDA build; the index must carry TORCH_VERSION for that CUDA (see pytorch.org).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
        ca-certificates && rm -rf /var/lib/apt/lists/*
COPY docker/ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH
RUN pip install -q "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
# The sources are installed, then removed (a moments/ folder in the working directory would shadow
# the installed package); dependencies first, from pyproject.toml alone, as in worker-cpu.Dockerfile.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
    print('\\n'.join(p['dependencies'] + p['optional-dependencies']['worker'] + p['optional-dependencies']['awq']))" \
    >/tmp/requirements.txt && pip install -q -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY README.md ./
COPY moments ./moments
COPY service ./service
COPY workers ./workers
COPY tools ./tools
COPY protos ./protos
RUN pip install -q --no-deps . && cd / && rm -rf /src
WORKDIR /app
COPY docker/healthcheck.py /app/healthcheck.py
COPY docker/worker-entrypoint.sh /app/worker-entrypoint.sh
ENV MOMENTS_DATA_DIR=/data \
    MOMENTS_DEVICE=cuda \
    HF_HOME=/models
VOLUME ["/data", "/models"]
HEALTHCHECK --interval=2s --timeout=3s --start-period=900s CMD ["python", "/app/healthcheck.py", "worker"]
ENTRYPOINT ["/app/worker-entrypoint.sh"]
