# edgecompress for x86-nvidia: TensorRT on a discrete NVIDIA GPU (NGC TensorRT image: TensorRT, its Python
# bindings and trtexec). Builds the engine from a mounted run directory's export and verifies it:
#   edgecompress docker x86-nvidia --run-dir runs/x   (prints the exact build and run commands)
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.01-py3
FROM ${BASE_IMAGE}

# The image's Python is the system one (Ubuntu 24.04): allow pip beside apt's packages, as NGC images do.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache \
    PATH=/opt/tensorrt/bin:/usr/src/tensorrt/bin:${PATH}

WORKDIR /opt/edgecompress
COPY constraints.txt constraints-runtime.txt setup.cfg pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY models/ models/
COPY targets/ targets/
# torch only runs the teacher in verify, on the CPU: its CPU build keeps the image free of a second CUDA stack.
# Where it comes from, as in cpu.Dockerfile: docker/wheels/ (wheels pip looks at first; empty in git),
# TORCH_INDEX_URL (empty: no index, torch only from docker/wheels/), PIP_INDEX_URL (everything else).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL=https://pypi.org/simple
COPY docker/wheels/ /tmp/wheels/
RUN set -- --no-index; [ -z "$TORCH_INDEX_URL" ] || set -- --index-url "$TORCH_INDEX_URL"; \
    pip install --no-deps --find-links /tmp/wheels "$@" -c constraints.txt torch \
    && pip install --find-links /tmp/wheels -c constraints.txt . \
    && python3 -c "import sys, torch; sys.exit(torch.version.cuda and f'torch {torch.__version__} is a CUDA build')" \
    && rm -rf /tmp/wheels \
    && useradd --create-home --uid 1001 edge
# numeric, so the host resolves it; `edgecompress docker` runs with --user (host uid) so run files stay yours
USER 1001
ENTRYPOINT ["edgecompress"]
CMD ["--help"]
