"""The slow Docker test's tools: a stand-in for the CPU image's base, and the CPU torch wheel.

The CPU image's base, python:3.11.11-slim-bookworm, cannot be pulled here (no registry is reachable). The stand-in is
Debian bookworm bootstrapped with debootstrap (its Python is 3.11, as the official image's), made an image with
buildah (`FROM scratch`, `ADD rootfs.tar /`), with what the official image has that a bare Debian lacks for the
Dockerfile: `python` and `pip` that install into the system Python (Debian marks it externally managed), and this
machine's CA bundle, which pip inside a build needs to reach the package index through this network.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
PACKAGES = "python3,python3-pip,python3-venv,python-is-python3,ca-certificates"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
STANDIN_DOCKERFILE = """\
FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8 \\
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
"""


def missing() -> str:
    """Why the stand-in cannot be built here, "" where it can."""
    if os.geteuid() != 0:
        return "debootstrap and buildah's chroot isolation need root"
    absent = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if absent:
        return f"{' and '.join(absent)} not installed (apt-get install -y buildah debootstrap; .ci/install does)"
    return ""


def run(command: list[str], timeout: float, heavy: bool = False) -> str:
    """Run a command (heavy ones at lower priority: the machine is shared), fail with its last lines."""
    command = ["nice", "-n", "10", *command] if heavy else command
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    tail = "\n".join(result.stdout.splitlines()[-25:])
    assert result.returncode == 0, f"{' '.join(command[:4])} ... exited {result.returncode}:\n{tail}"
    return result.stdout


def bootstrap_base(work: Path, tag: str, timings: dict) -> str:
    """Debootstrap bookworm into `work`, make it the image `tag` with buildah; the root filesystem is removed
    once the image holds it. Returns the tag; `timings` gets the seconds of each step."""
    rootfs, context = work / "rootfs", work / "context"
    start = time.perf_counter()
    run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(rootfs), MIRROR], 900, heavy=True)
    timings["debootstrap_s"] = round(time.perf_counter() - start, 1)
    (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
    if CA_BUNDLE.is_file():
        shutil.copyfile(CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):  # as the official slim image: no apt caches
        for item in (rootfs / cache).glob("*"):
            if item.is_file():
                item.unlink()
    context.mkdir()
    start = time.perf_counter()
    run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(context / "rootfs.tar"), "."], 600)
    shutil.rmtree(rootfs)
    (context / "Dockerfile").write_text(STANDIN_DOCKERFILE)
    run(["buildah", "bud", "--isolation", "chroot", "-t", tag, str(context)], 600, heavy=True)
    shutil.rmtree(context)
    timings["base_image_s"] = round(time.perf_counter() - start, 1)
    return tag


def torch_pin(repo: Path) -> str:
    """The torch version constraints.txt pins (the CPU image installs it)."""
    found = re.search(r"^torch==([\w.]+)$", (repo / "constraints.txt").read_text(), re.M)
    assert found, "constraints.txt pins no torch version"
    return found.group(1)


def cpu_torch_wheel(dest: Path, version: str) -> Path | None:
    """Torch `version`'s CPU build for this Python, fetched by pip into `dest` (pip's own configuration says where
    from: here its find-links folder holds the wheel); None where pip finds none."""
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                             "--dest", str(dest), f"torch=={version}+cpu"], capture_output=True, text=True,
                            timeout=600)
    wheels = sorted(dest.glob(f"torch-{version}+cpu-*.whl"))
    return wheels[0] if result.returncode == 0 and wheels else None
