# layerbank image for the API and the GPU workers (one image, two commands).
#
# The base image brings CUDA, cuDNN and a CUDA build of torch. The project is installed with
# that torch pinned as a constraint, so pip fails instead of replacing it with another build.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf \
    LAYERBANK_STORE=/data/store \
    LAYERBANK_HOST=0.0.0.0 \
    LAYERBANK_PORT=8000

# A font with Chinese, Japanese and Korean characters, for class names in those scripts in the
# PNG figures (service/plots.py falls back to it).
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-wqy-microhei \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

COPY pyproject.toml README.md* ./
COPY store ./store
COPY workers ./workers
COPY service ./service

RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" \
        > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt . \
    && rm /tmp/torch-constraint.txt

# Named volumes copy ownership from the image, so the non-root user can write the store and
# the Hugging Face cache.
RUN useradd --create-home --uid 10001 --user-group layerbank \
    && mkdir -p /data/store /data/hf /data/models /data/datasets \
    && chown -R layerbank:layerbank /data
USER layerbank

EXPOSE 8000

# The API's liveness route; the worker service in docker-compose.yml replaces this check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LAYERBANK_PORT', '8000') + '/healthz', timeout=4)"]

CMD ["python", "-m", "service.serve"]
