# The gRPC front end: no torch, no GPU. Build from the repository root:
#   docker build -f docker/frontend.Dockerfile -t moments-frontend .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY moments ./moments
COPY service ./service
COPY workers ./workers
COPY tools ./tools
COPY protos ./protos
RUN pip install --no-cache-dir .
ENV MOMENTS_LISTEN=0.0.0.0:50051 \
    MOMENTS_DATA_DIR=/data \
    MOMENTS_METRICS_PORT=9100
EXPOSE 50051 9100
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c=grpc.insecure_channel('127.0.0.1:50051'); sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(),timeout=2).status==1 else 1)"
CMD ["python", "-m", "moments.service"]
