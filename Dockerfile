# One image for the API and the worker; the command picks the role.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TUNEFORGE_DATA_DIR=/data

# bubblewrap sandboxes model-written code during evaluation.
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/tuneforge
# torch first and pinned: any range admitting a newer release pulls other builds.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX_URL}
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY tuneforge ./tuneforge
COPY migrations ./migrations
RUN pip install -e ".[worker]"

RUN useradd --system --create-home --uid 10001 tuneforge && mkdir -p /data && chown tuneforge /data
USER tuneforge
VOLUME ["/data"]
EXPOSE 8000
CMD ["tuneforge", "serve", "--host", "0.0.0.0", "--port", "8000"]
