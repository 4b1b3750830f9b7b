# One image for producer, worker and sandbox: `passbridge <command>`.
# Build stage: wheels for passbridge and its runtime dependencies (no dev extras).
FROM python:3.12-slim AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends gcc && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY passbridge ./passbridge
COPY producer ./producer
COPY worker ./worker
COPY klaviyo_sandbox ./klaviyo_sandbox
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: slim, non-root, only the wheels.
FROM python:3.12-slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PASSBRIDGE_LOG_FORMAT=json PASSBRIDGE_STATE_DIR=/var/lib/passbridge
RUN useradd --system --uid 10001 --home-dir /var/lib/passbridge --create-home passbridge
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER passbridge
WORKDIR /var/lib/passbridge
EXPOSE 8000 8080
ENTRYPOINT ["passbridge"]
CMD ["--help"]
