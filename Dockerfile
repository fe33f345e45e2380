# sam-backend: SAM (keras-hub) as a Label Studio ML backend.
#   docker build -t sam-backend .                                # CPU torch
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t sam-backend:cuda .
#   docker run -p 9090:9090 -v sam-models:/data -e SAM_PRESET=sam_base_sa1b sam-backend
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# The CPU wheel index by default, or the CUDA index that matches your driver (cu126, cu128...).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    KERAS_BACKEND=torch \
    TF_CPP_MIN_LOG_LEVEL=3 \
    MODEL_DIR=/data \
    KAGGLEHUB_CACHE=/data/kagglehub \
    HF_HOME=/data/huggingface \
    KERAS_HOME=/data/keras \
    SAM_PRESET=sam_base_sa1b \
    PORT=9090 \
    WORKERS=1 \
    THREADS=8 \
    LOG_LEVEL=INFO

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# tcmalloc about halves the ViT encoder's time on CPU (docs/speed.md: Memory allocator).
# The symlink gives LD_PRELOAD (below) one path on every architecture. Debian 13
# renamed the package libtcmalloc-minimal4t64.
RUN apt-get update \
    && { apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
         || apt-get install -y --no-install-recommends libtcmalloc-minimal4t64; } \
    && rm -rf /var/lib/apt/lists/* \
    && lib="$(find /usr/lib -name libtcmalloc_minimal.so.4 -print -quit)" \
    && test -f "$lib" \
    && ln -s "$lib" /usr/local/lib/libtcmalloc_minimal.so.4

WORKDIR /app
COPY pyproject.toml README.md label_config.xml label_config_polygons.xml label_config_concepts.xml ./
COPY sam_backend ./sam_backend
# uv reads [tool.uv] in pyproject.toml: keras-hub without tensorflow-text, so no
# TensorFlow (docs/installation.md). The torch installed above satisfies the package.
RUN pip install uv \
    && uv pip install --system --no-cache ".[concepts]" \
    && pip uninstall -y uv \
    && useradd --create-home --uid 1000 sam && mkdir -p /data && chown sam:sam /data

# The AVX-512 attention kernel (docs/speed.md: Attention kernel), compiled once here so
# that the image needs no compiler; CPUs without AVX-512 keep torch's attention.
ENV SAM_KERNEL_DIR=/opt/sam-kernels
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && python -m sam_backend.accel.attention_kernel "${SAM_KERNEL_DIR}" \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

USER sam
# For every process of the container: gunicorn (the entry point below) and its
# workers, and `sam-backend` commands run in it. `-e LD_PRELOAD=` turns it off.
ENV LD_PRELOAD=/usr/local/lib/libtcmalloc_minimal.so.4
VOLUME ["/data"]
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s --start-period=120s --retries=3 \
    CMD ["sam-backend", "healthcheck"]

ENTRYPOINT ["sh", "-c", "exec gunicorn --bind 0.0.0.0:${PORT} --workers ${WORKERS} --threads ${THREADS} --worker-class gthread --timeout 300 --access-logfile - --config python:sam_backend.gunicorn_conf sam_backend.wsgi:app"]
