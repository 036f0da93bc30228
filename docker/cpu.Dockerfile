# edgecompress for CPU targets: x86-cpu, x86-openvino, and the builder of mobile-arm64's .ort file.
# Finishes and verifies a run directory mounted at the same path as on the host:
#   edgecompress docker x86-cpu --run-dir runs/x   (prints the exact build and run commands)
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache

WORKDIR /opt/edgecompress
COPY constraints.txt constraints-runtime.txt setup.cfg pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY models/ models/
COPY targets/ targets/
# Where torch comes from: its CPU build (PyPI's x86 wheel pulls CUDA libraries), the version constraints.txt pins.
#   docker/wheels/   a folder of wheels pip looks at first, for torch and everything else (empty in git; the one
#                    folder of docker/ that .dockerignore lets into the build context)
#   TORCH_INDEX_URL  the index pip takes torch from (torch's CPU index, or a mirror of it); empty: no index at all,
#                    torch only from docker/wheels/
#   PIP_INDEX_URL    the index for everything else (PyPI, or a mirror of it behind a proxy)
# Built here with no access to torch's index: its CPU wheel in docker/wheels/ and --build-arg TORCH_INDEX_URL= .
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL=https://pypi.org/simple
COPY docker/wheels/ /tmp/wheels/
# torch alone first (its dependencies come with the package, from PIP_INDEX_URL); a CUDA build fails the image.
# The openvino extra: this image also serves the x86-openvino target.
RUN set -- --no-index; [ -z "$TORCH_INDEX_URL" ] || set -- --index-url "$TORCH_INDEX_URL"; \
    pip install --no-deps --find-links /tmp/wheels "$@" -c constraints.txt torch \
    && pip install --find-links /tmp/wheels -c constraints.txt ".[openvino]" \
    && pip check \
    && python3 -c "import sys, torch; sys.exit(torch.version.cuda and f'torch {torch.__version__} is a CUDA build')" \
    && rm -rf /tmp/wheels \
    && useradd --create-home --uid 1000 edge
# numeric, so the host resolves it; `edgecompress docker` runs with --user (host uid) so run files stay yours
USER 1000
ENTRYPOINT ["edgecompress"]
CMD ["--help"]
