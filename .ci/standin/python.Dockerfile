# Stand-in for python:3.11-slim (built by .ci/standin/build where no registry can be reached):
# Debian bookworm's Python 3.11 in a venv that comes first on PATH, so `python`, `python3` and
# `pip` are the image's Python as in the real image; bash, as there.
ARG BASE=broker-ci/debian:bookworm
FROM ${BASE}
# the host's CA bundle (copied into the build context at build time, never committed)
COPY host-ca.crt /usr/local/share/ca-certificates/host-ca.crt
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && update-ca-certificates >/dev/null \
    && python3 -m venv /usr/local/python
# pip (certifi) and Python's ssl trust the system bundle, the host's CAs included
ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
LABEL org.opencontainers.image.description="stand-in for python:3.11-slim, built by broker's .ci/standin/build"
CMD ["python3"]
