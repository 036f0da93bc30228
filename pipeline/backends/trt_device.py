"""What this host offers TensorRT: the tensorrt package, CUDA devices (through libcuda, no toolkit needed) and, on a
Jetson, the L4T release. An engine is tied to all three: TensorRT refuses an engine from another TensorRT version,
and tactics chosen for one GPU are wrong or invalid on another, so build.json records them and nothing reuses or
times an engine made elsewhere.
"""
from __future__ import annotations

import ctypes
import platform
import re
from pathlib import Path

L4T_RELEASE = Path("/etc/nv_tegra_release")
# CUdevice_attribute values (cuda.h): compute capability major / minor
CC_MAJOR, CC_MINOR = 75, 76


def _libcuda():
    for library in ("libcuda.so.1", "libcuda.so"):
        try:
            return ctypes.CDLL(library)
        except OSError:
            continue
    return None


def _driver():
    """(libcuda, the number of devices it reports) after cuInit; (None, 0) without a driver or a device."""
    cuda, count = _libcuda(), ctypes.c_int(0)
    if cuda is None or cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return None, 0
    return cuda, count.value


def cuda_devices() -> list[dict]:
    """Name and compute capability of each CUDA device the driver reports ([] without a driver or a device):
    libcuda's cuInit, cuDeviceGetCount, cuDeviceGetName and cuDeviceGetAttribute."""
    cuda, count = _driver()
    devices = []
    for ordinal in range(count):
        device, name = ctypes.c_int(0), ctypes.create_string_buffer(256)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        if cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            continue
        cuda.cuDeviceGetName(name, 256, device)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), CC_MAJOR, device)
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), CC_MINOR, device)
        devices.append({"name": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"})
    return devices


def cuda_device_count() -> int:
    """CUDA devices the driver reports (0 without a driver): libcuda's cuInit + cuDeviceGetCount."""
    return _driver()[1]


def cuda_driver_version() -> str:
    """The CUDA version the driver supports, "12.6" (cuDriverGetVersion), or "" without a driver."""
    cuda, version = _libcuda(), ctypes.c_int(0)
    if cuda is None or cuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return ""
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def l4t_release(path: Path = L4T_RELEASE) -> str:
    """"36.4.0" from a Jetson's /etc/nv_tegra_release ("# R36 (release), REVISION: 4.0, ..."), "" elsewhere."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    found = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{found.group(1)}.{found.group(2)}" if found else ""


def tensorrt_version() -> str:
    """The installed tensorrt package's version, "" when it is not installed."""
    try:
        import tensorrt
    except ImportError:
        return ""
    return tensorrt.__version__


def install_advice(machine: str | None = None) -> str:
    """How to get TensorRT's Python bindings on this kind of machine."""
    if (machine or platform.machine()) == "aarch64":
        # JetPack ships TensorRT with its bindings as apt packages matched to its CUDA; PyPI's aarch64 tensorrt
        # wheels are built for SBSA servers, not for Jetson's L4T
        return "on a Jetson the bindings come with JetPack: `sudo apt install python3-libnvinfer` (not pip)"
    return "pip install 'edgecompress[tensorrt]' (TensorRT 10.x) on the GPU machine"


def unavailable_reason() -> str:
    """Why this host cannot build a TensorRT engine, or "" when it can."""
    if not tensorrt_version():
        return f"the tensorrt Python package is not installed ({install_advice()})"
    if cuda_device_count() == 0:
        return "no CUDA device (the CUDA driver reports none)"
    return ""


def environment() -> dict:
    """What decides the engine this host builds: TensorRT, the first CUDA device, the CUDA driver, L4T."""
    devices = cuda_devices()
    return {"tensorrt": tensorrt_version() or None, "device": devices[0] if devices else None,
            "cuda_driver": cuda_driver_version() or None, "l4t": l4t_release() or None}


def mismatch(built: dict, here: dict) -> str:
    """Why an engine built in environment `built` must not run in `here` ("" when it may): another TensorRT
    version or another GPU model. The CUDA driver may differ (newer drivers run older engines)."""
    for key, what in (("tensorrt", "TensorRT"), ("device", "GPU")):
        if built.get(key) != here.get(key):
            return f"{what} {built.get(key)} where the engine was built, {here.get(key)} here"
    return ""
