# syntax=docker/dockerfile:1
# Build: docker build -t upload-broker .
# Run:   docker run -p 8000:8000 -e BROKER_SECRET_KEY=… -e BROKER_DATABASE_URL=… \
#          -e BROKER_CLOUDFLARE_ACCOUNT_ID=… -e BROKER_CLOUDFLARE_API_TOKEN=… \
#          -e BROKER_CLOUDFLARE_ACCOUNT_HASH=… upload-broker

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md wsgi.py ./
COPY broker ./broker
COPY templates ./templates
COPY static ./static
# A wheel (non-editable): templates and static files are shipped inside the package.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install /wheels/*.whl

FROM python:3.11-slim-bookworm AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BROKER_ENV=production \
    BROKER_INSTANCE_PATH=/var/lib/broker \
    FLASK_APP=broker \
    PORT=8000
RUN groupadd --system broker && useradd --system --gid broker --home-dir /var/lib/broker broker \
 && mkdir -p /var/lib/broker /app && chown broker:broker /var/lib/broker
COPY --from=build /opt/venv /opt/venv
COPY wsgi.py gunicorn.conf.py /app/
WORKDIR /app
USER broker
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2).status == 200 else 1)"]
# Apply migrations (safe when replicas start together: `flask db upgrade` holds a PostgreSQL
# advisory lock, so one migrates and the others wait, then find nothing to do), make sure the
# declared variants and signing keys are there (a Cloudflare
# hiccup must not keep the site down: the worker syncs keys again), then serve with threaded
# workers (gunicorn.conf.py: the work is I/O-bound). Run the worker from the same image:
# `… upload-broker flask worker`; compose.yaml runs the whole system from it.
CMD ["sh", "-c", "flask db upgrade && { flask variants sync && flask keys sync || echo 'upstream sync failed; continuing' >&2; } && exec gunicorn -c gunicorn.conf.py wsgi:app"]
