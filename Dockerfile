# The gateway in a container: non-root, configured by env and/or a mounted config file.
#
#   docker build -t gateway .
#   docker run -p 8080:8080 -v gateway-data:/srv/gateway/data \
#     -e GATEWAY_ADMIN_TOKEN=... -e GATEWAY_MASTER_KEYS=... gateway
#
# The working directory is /srv/gateway, so the default paths (data/gateway.db,
# data/master.key, data/admin_token.sha256) land in the volume. Without
# GATEWAY_MASTER_KEYS / GATEWAY_ADMIN_TOKEN the first start writes a master key and an
# admin token hash there and prints the token once. A config file mounted at
# /srv/gateway/gateway.yaml is read automatically (or point GATEWAY_CONFIG at one);
# any key can be set as GATEWAY_<SECTION>__<KEY>, e.g. GATEWAY_DATABASE__URL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY openrouter_emulator ./openrouter_emulator
RUN pip install . \
    && rm -rf /build \
    && useradd --system --uid 10001 --home-dir /srv/gateway --shell /usr/sbin/nologin gateway \
    && mkdir -p /srv/gateway/data \
    && chown -R gateway:gateway /srv/gateway

USER gateway
WORKDIR /srv/gateway
VOLUME ["/srv/gateway/data"]
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GATEWAY_SERVER__PORT', '8080') + '/health', timeout=4)"]

CMD ["gateway", "serve", "--host", "0.0.0.0"]
