# The stream_app worker image: `docker compose up` builds it for the `topics` and `worker` services.
# Configure it only through STREAM_APP_* environment variables (see stream_app/settings.py).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package needs, so edits to tests or docs do not invalidate the install layer.
# (README.md* is a glob so the build works whether or not the README exists yet.)
COPY pyproject.toml README.md* ./
COPY stream_app ./stream_app
RUN pip install . \
    && useradd --create-home --uid 10001 stream \
    && mkdir -p /var/lib/stream_app \
    && chown stream /var/lib/stream_app

USER stream
WORKDIR /var/lib/stream_app
ENV STREAM_APP_STATE_DIR=/var/lib/stream_app \
    STREAM_APP_WEB_HOST=0.0.0.0 \
    STREAM_APP_WEB_PORT=6066
VOLUME ["/var/lib/stream_app"]
EXPOSE 6066

# The worker drains in-flight events and commits on SIGTERM (docker stop).
STOPSIGNAL SIGTERM
ENTRYPOINT ["stream-app"]
CMD ["worker"]
