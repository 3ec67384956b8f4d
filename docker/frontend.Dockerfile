# The gRPC front end: no torch, no GPU. Build from the repository root (the base image comes from
# scripts/build_base_image.sh; docker/README.md says how):
#   docker build --network host -f docker/frontend.Dockerfile -t moments-frontend .
FROM moments-base:bookworm
COPY docker/ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH
# The sources are installed, then removed: a moments/ folder in the working directory would shadow
# the installed package (its service/, workers/ and tools/ are mapped into it).
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a change of code or README reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
    print('\\n'.join(p['dependencies']))" >/tmp/requirements.txt \
    && pip install -q -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY README.md ./
COPY moments ./moments
COPY service ./service
COPY workers ./workers
COPY tools ./tools
COPY protos ./protos
RUN pip install -q --no-deps . && cd / && rm -rf /src
WORKDIR /app
COPY docker/healthcheck.py /app/healthcheck.py
ENV MOMENTS_LISTEN=127.0.0.1:50051 \
    MOMENTS_DATA_DIR=/data \
    MOMENTS_METRICS_PORT=9100
VOLUME ["/data"]
HEALTHCHECK --interval=2s --timeout=3s --start-period=120s CMD ["python", "/app/healthcheck.py", "frontend"]
CMD ["python", "-m", "moments.service"]
