# edgecompress for Jetson targets (jetson-orin-nano, jetson-agx-orin): NVIDIA's L4T JetPack image for arm64
# (L4T r36.4, JetPack 6.1: CUDA 12.6, TensorRT 10.3 with its Python bindings and trtexec). Build and run it on the
# Jetson (docker run --runtime nvidia); it builds the engine from a mounted run directory and verifies it:
#   edgecompress docker jetson-agx-orin --run-dir runs/x   (prints the exact build and run commands)
ARG BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache \
    PATH=/usr/src/tensorrt/bin:${PATH}

# apt versions are left to the pinned L4T base: its NVIDIA apt repository serves the python3-libnvinfer that
# matches the image's TensorRT, and a pinned version string would break on the next L4T point release
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-pip python3-libnvinfer \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/edgecompress
COPY constraints.txt constraints-runtime.txt setup.cfg pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY models/ models/
COPY targets/ targets/
# PyPI's aarch64 torch wheel is a CPU build: it runs the teacher in verify; TensorRT runs the student on the GPU/DLA.
# Where it comes from, as in cpu.Dockerfile: docker/wheels/ (wheels pip looks at first; empty in git),
# TORCH_INDEX_URL (empty: no index, torch only from docker/wheels/), PIP_INDEX_URL (everything else).
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG PIP_INDEX_URL=https://pypi.org/simple
COPY docker/wheels/ /tmp/wheels/
RUN set -- --no-index; [ -z "$TORCH_INDEX_URL" ] || set -- --index-url "$TORCH_INDEX_URL"; \
    python3 -m pip install --no-deps --find-links /tmp/wheels "$@" -c constraints.txt torch \
    && python3 -m pip install --find-links /tmp/wheels -c constraints.txt . \
    && rm -rf /tmp/wheels \
    && useradd --create-home --uid 1001 edge
# numeric, so the host resolves it; `edgecompress docker` runs with --user (host uid) so run files stay yours
USER 1001
ENTRYPOINT ["edgecompress"]
CMD ["--help"]
