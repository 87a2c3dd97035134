# Eddy: the same steps as `make serve` (a venv with `pip install .`), in two stages.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY service service
COPY handlers handlers
COPY storage storage
RUN python -m venv /opt/eddy && /opt/eddy/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /var/lib/eddy --create-home eddy
COPY --from=build /opt/eddy /opt/eddy
ENV PATH=/opt/eddy/bin:$PATH \
    EDDY_STORAGE=sqlite:////var/lib/eddy/eddy.db \
    EDDY_ADDRESS=0.0.0.0 \
    EDDY_PORT=8888
# The SQLite file (and the development secret, when EDDY_JWT_SECRET is unset) live here.
VOLUME ["/var/lib/eddy"]
USER 10001
WORKDIR /var/lib/eddy
EXPOSE 8888
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['EDDY_PORT'], timeout=2)"]
ENTRYPOINT ["eddy", "serve"]
