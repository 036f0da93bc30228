"""edgecompress: teacher + data + target -> a verified, compact artifact for an edge device."""
import os

__version__ = "0.1.0"

# A run reaches no network. ONNX Runtime (1.29 and newer) starts a telemetry uploader with its environment that
# looks up and reaches Microsoft's event endpoint about ten seconds later; this variable, read once before the
# environment exists, is its only full opt-out (disable_telemetry_events() leaves the uploader running). Set
# here, before any module of the package imports onnxruntime, and inherited by the processes a run starts.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
