# A CPU worker that serves the shipped tiny grounder out of the box (MOMENTS_MODEL names another
# checkpoint). torch is the CPU build, from a wheel in docker/wheels/ when one is there. Build from
# the repository root (the base image comes from scripts/build_base_image.sh):
#   docker build --network host -f docker/worker-cpu.Dockerfile -t moments-worker-cpu .
FROM moments-base:bookworm
COPY docker/ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH
# torch first, in a layer of its own (the largest; code changes do not rebuild it).
COPY docker/wheels/ /tmp/wheels/
RUN if ls /tmp/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; \
    then pip install -q /tmp/wheels/torch-2.13.0+cpu-*.whl; \
    else pip install -q --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"; fi \
    && rm -rf /tmp/wheels
# The sources are installed, then removed: a moments/ folder in the working directory would shadow
# the installed package (its service/, workers/ and tools/ are mapped into it).
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a change of code or README reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
    print('\\n'.join(p['dependencies'] + p['optional-dependencies']['worker']))" >/tmp/requirements.txt \
    && pip install -q -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY README.md ./
COPY moments ./moments
COPY service ./service
COPY workers ./workers
COPY tools ./tools
COPY protos ./protos
RUN pip install -q --no-deps . && cd / && rm -rf /src \
    && ln -s "$(python -c 'from moments.tools import GROUNDER_DIR; print(GROUNDER_DIR)')" /opt/grounder
WORKDIR /app
COPY docker/healthcheck.py /app/healthcheck.py
COPY docker/worker-entrypoint.sh /app/worker-entrypoint.sh
ENV MOMENTS_DATA_DIR=/data \
    MOMENTS_DEVICE=cpu \
    MOMENTS_MODEL=/opt/grounder \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
VOLUME ["/data"]
HEALTHCHECK --interval=2s --timeout=3s --start-period=300s CMD ["python", "/app/healthcheck.py", "worker"]
ENTRYPOINT ["/app/worker-entrypoint.sh"]
