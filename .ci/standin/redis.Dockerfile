# Stand-in for redis:7.0 (built by .ci/standin/build where no registry can be reached): Debian
# bookworm's redis-server 7.0, run like the real image: `redis-server ...` as the redis user, in
# /data (a volume), protected mode off (the container's network is the boundary), port 6379.
ARG BASE=broker-ci/debian:bookworm
FROM ${BASE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint /usr/local/bin/docker-entrypoint.sh
VOLUME /data
WORKDIR /data
EXPOSE 6379
LABEL org.opencontainers.image.description="stand-in for redis:7.0, built by broker's .ci/standin/build"
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
