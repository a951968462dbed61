# The worker image: the `broker` CLI (library, worker runtime, example workers) on Python 3.11.
#   docker build -t broker .
#   docker run --rm -e BROKER_URL=redis://host:6379/0 broker worker broker.workers.examples:process_order --channel orders --group fulfilment
# compose.yaml builds it for its producer, consumer and tail services.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# only what the distribution is built from (pyproject.toml names README.md as its readme)
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY workers ./workers
COPY cli ./cli
RUN pip install ".[uvloop]" \
    && useradd --system --uid 10001 --no-create-home --home-dir /app broker

USER broker
# healthy while this container's worker reports a fresh heartbeat (services that run no worker,
# such as `broker tail`, disable it in compose.yaml)
HEALTHCHECK --interval=5s --timeout=5s --start-period=15s --retries=3 \
    CMD ["broker", "worker", "--check"]
ENTRYPOINT ["broker"]
CMD ["--help"]
