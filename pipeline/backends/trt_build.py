"""TensorRT's Python API: build the engine from builder settings (tensorrt.py), and run it for verify.

Only this module imports tensorrt, and only where the package and a CUDA device exist; the tests here reach it
through the cuda-marked tests, plus `attach_timing_cache` and `parse_trtexec_times`, which take plain objects.
"""
from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import numpy as np

from .. import files
from ..errors import StageFailed

LAYER_INFO_NAME = "layer_info.json"


def attach_timing_cache(config, cached: bytes, log=print) -> str:
    """Give the builder config a timing cache made from `cached` (a previous build's file, or b"").
    `IBuilderConfig.set_timing_cache(cache, ignore_mismatch=False)` returns False when the cache was made on
    another GPU or TensorRT version (pyCoreDoc.h); such a cache is dropped for a fresh one, since a build
    whose cache was refused has none and `get_timing_cache()` then returns None. Returns what happened."""
    cache = config.create_timing_cache(cached)  # None when TensorRT cannot read the file at all
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return "reused" if cached else "new"
    log("[export] the timing cache was made on another GPU or TensorRT version: starting a new one")
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        raise StageFailed("TensorRT refused an empty timing cache; set timing_cache = \"\" in the target's [tensorrt]")
    return "replaced (made on another GPU or TensorRT version)"


def build_engine(onnx_path: Path, settings, engine_path: Path, log=print) -> dict:
    """Build and serialise the engine with TensorRT's Python API, with the builder flags trtexec's line sets
    (tensorrt.trtexec_build_command for the same settings); returns what the builder decided."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network_flags = 0
    for name in settings.network_flags:
        network_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StageFailed(f"TensorRT's ONNX parser refused {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # trtexec --profilingVerbosity=detailed
    for name in settings.builder_flags:
        if not hasattr(trt.BuilderFlag, name):
            raise StageFailed(f"TensorRT {trt.__version__} has no BuilderFlag.{name}: the settings were made for "
                              f"TensorRT {settings.tensorrt_major}")
        config.set_flag(getattr(trt.BuilderFlag, name))
    if settings.dla_core >= 0:
        if builder.num_DLA_cores <= settings.dla_core:
            raise StageFailed(f"dla_core = {settings.dla_core} but this device has {builder.num_DLA_cores} DLA cores")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = settings.dla_core
    profile = builder.create_optimization_profile()
    profile.set_shape(settings.input_name, settings.min_shape, settings.opt_shape, settings.max_shape)
    config.add_optimization_profile(profile)
    cache_path = engine_path.parent / settings.timing_cache if settings.timing_cache else None
    cache_note = "none"
    if cache_path:
        cache_note = attach_timing_cache(config, cache_path.read_bytes() if cache_path.is_file() else b"", log)

    placement = {}
    if settings.dla_core >= 0:
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            placement[layer.name] = "DLA" if config.can_run_on_DLA(layer) else "GPU"
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StageFailed(f"TensorRT could not build an engine from {onnx_path.name} (its log above says why)")
    with files.atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache_path:
        cache = config.get_timing_cache()
        if cache is not None:
            with files.atomic_path(cache_path) as tmp:
                tmp.write_bytes(bytes(cache.serialize()))
    # the builder's own account of each layer (trtexec --exportLayerInfo), beside the DLA prediction
    runtime = trt.Runtime(logger)
    if settings.dla_core >= 0:
        runtime.DLA_core = settings.dla_core
    engine = runtime.deserialize_cuda_engine(bytes(serialized))
    inspector = engine.create_engine_inspector()
    files.write_text(engine_path.parent / LAYER_INFO_NAME,
                     inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return {"tensorrt": trt.__version__, "engine": engine_path.name, "engine_sha256": files.sha256(engine_path),
            "layers": network.num_layers, "dla_placement": placement, "timing_cache": cache_note,
            "layer_info": LAYER_INFO_NAME}


class _Cuda:
    """The few CUDA driver calls a runner needs (libcuda through ctypes: TensorRT's images carry no PyTorch CUDA
    build), on the device's primary context, which TensorRT's runtime shares."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")
        device, context = ctypes.c_int(0), ctypes.c_void_p()
        self.check(self.lib.cuInit(0), "cuInit")
        self.check(self.lib.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
        self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
        self.check(self.lib.cuCtxSetCurrent(context), "cuCtxSetCurrent")

    @staticmethod
    def check(status: int, call: str) -> None:
        if status != 0:
            raise StageFailed(f"CUDA {call} failed with error {status}")

    def alloc(self, nbytes: int) -> int:
        pointer = ctypes.c_uint64(0)
        self.check(self.lib.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(max(nbytes, 1))), "cuMemAlloc")
        return pointer.value

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        self.check(self.lib.cuMemcpyHtoD_v2(ctypes.c_uint64(pointer), array.ctypes.data_as(ctypes.c_void_p),
                                            ctypes.c_size_t(array.nbytes)), "cuMemcpyHtoD")

    def to_host(self, array: np.ndarray, pointer: int) -> None:
        self.check(self.lib.cuMemcpyDtoH_v2(array.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint64(pointer),
                                            ctypes.c_size_t(array.nbytes)), "cuMemcpyDtoH")

    def stream(self) -> int:
        handle = ctypes.c_void_p()
        self.check(self.lib.cuStreamCreate(ctypes.byref(handle), 0), "cuStreamCreate")
        return handle.value or 0

    def synchronize(self, stream: int) -> None:
        self.check(self.lib.cuStreamSynchronize(ctypes.c_void_p(stream)), "cuStreamSynchronize")

    def free(self, pointer: int) -> None:
        self.lib.cuMemFree_v2(ctypes.c_uint64(pointer))

    def destroy(self, stream: int) -> None:
        self.lib.cuStreamDestroy_v2(ctypes.c_void_p(stream))


def profile_chunks(x: np.ndarray, min_batch: int, max_batch: int) -> list[tuple[np.ndarray, int]]:
    """`x` cut into batches an optimisation profile of [min_batch, max_batch] takes: (batch, rows that are x's);
    a short last batch is padded with copies of its last row up to min_batch."""
    chunks = []
    for start in range(0, len(x), max_batch):
        chunk = x[start:start + max_batch]
        short = max(0, min_batch - len(chunk))
        chunks.append((np.concatenate([chunk, np.repeat(chunk[-1:], short, axis=0)]) if short else chunk, len(chunk)))
    return chunks


class TensorRTRunner:
    """The built engine on the GPU (or its DLA core): x (float32 NCHW on the host) -> logits on the host, in
    chunks the engine's optimisation profile allows (a short last chunk is padded to min_batch and trimmed). The
    time of a call includes the copies to and from the device, as an application's would; trtexec's GPU compute
    time (verify records it too) leaves them out."""

    def __init__(self, engine_path: Path, dla_core: int, runtime_label: str, min_batch: int, max_batch: int):
        import tensorrt as trt

        self.runtime, self.cuda = runtime_label, _Cuda()
        self.min_batch, self.max_batch = min_batch, max_batch
        trt_runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if dla_core >= 0:
            trt_runtime.DLA_core = dla_core
        self.engine = trt_runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise StageFailed(f"TensorRT could not load {engine_path.name}: rebuild it with `edgecompress export "
                              "RUN --force` on this device")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.buffers: dict[tuple, tuple[int, int]] = {}
        self.stream = self.cuda.stream()  # TensorRT warns that the default stream adds synchronisation
        self.version, self.dla_core = trt.__version__, dla_core

    def _run(self, x: np.ndarray) -> np.ndarray:
        if not self.context.set_input_shape(self.input, x.shape):
            raise StageFailed(f"the engine refuses input shape {x.shape} (its profile: batch {self.min_batch} to "
                              f"{self.max_batch})")
        out = np.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=np.float32)
        if x.shape not in self.buffers:  # device buffers per batch shape, made once
            self.buffers[x.shape] = (self.cuda.alloc(x.nbytes), self.cuda.alloc(out.nbytes))
        x_device, out_device = self.buffers[x.shape]
        self.cuda.to_device(x_device, x)
        self.context.set_tensor_address(self.input, x_device)
        self.context.set_tensor_address(self.output, out_device)
        if not self.context.execute_async_v3(self.stream):
            raise StageFailed("TensorRT failed to run the engine (its log above says why)")
        self.cuda.synchronize(self.stream)
        self.cuda.to_host(out, out_device)
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.concatenate([self._run(chunk)[:used] for chunk, used in
                               profile_chunks(x, self.min_batch, self.max_batch)])

    def close(self) -> None:
        for pair in self.buffers.values():
            for pointer in pair:
                self.cuda.free(pointer)
        self.buffers = {}
        if self.stream:
            self.cuda.destroy(self.stream)
            self.stream = 0

    def __del__(self):
        try:
            self.close()
        except Exception:  # the CUDA context may be gone at interpreter exit; nothing to free then
            pass

    def settings(self) -> dict:
        return {"runtime": self.runtime, "tensorrt": self.version, "dla_core": self.dla_core,
                "timing": "host wall clock per call, copies to and from the device included"}


GPU_COMPUTE = re.compile(r"GPU Compute Time: min = ([\d.]+) ms, max = ([\d.]+) ms, mean = ([\d.]+) ms, "
                         r"median = ([\d.]+) ms(?:, percentile\(90%\) = ([\d.]+) ms)?")


def parse_trtexec_times(text: str) -> dict | None:
    """trtexec's "GPU Compute Time: min = .. ms, max = .. ms, mean = .. ms, median = .. ms, percentile(90%) = ..
    ms, ..." line (samples/common/sampleReporting.cpp, printed after a log prefix) as milliseconds."""
    found = GPU_COMPUTE.search(text)
    if not found:
        return None
    values = dict(zip(("min", "max", "mean", "p50", "p90"), found.groups()))
    return {k: float(v) for k, v in values.items() if v is not None}


def trtexec_times(command: list[str], cwd: Path, timeout: float = 120) -> dict:
    """Run a trtexec latency line in the export folder; its GPU compute times, or {"error": why}."""
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"trtexec did not finish: {exc}"}
    times = parse_trtexec_times(result.stdout)
    if result.returncode != 0 or times is None:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or [f"exit {result.returncode}"]
        return {"error": f"trtexec failed: {last[0]}"}
    return times
