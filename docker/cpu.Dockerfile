# edgecompress for CPU targets: x86-cpu, and the builder of mobile-arm64's .ort file.
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
# torch's CPU build from its own index (PyPI's x86 wheel pulls CUDA libraries); constraints.txt pins the version.
RUN pip install --index-url https://download.pytorch.org/whl/cpu -c constraints.txt torch \
    && pip install -c constraints.txt . \
    && useradd --create-home --uid 1000 edge
# numeric, so the host resolves it; `edgecompress docker` runs with --user (host uid) so run files stay yours
USER 1000
ENTRYPOINT ["edgecompress"]
CMD ["--help"]
