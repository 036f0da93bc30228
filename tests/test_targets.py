"""Device target profiles: every shipped TOML loads; a user's TOML works; bad values are refused helpfully."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from edgecompress import targets
from edgecompress.cli import main
from edgecompress.config import tomllib  # tomli on Python 3.10
from edgecompress.errors import BadInput

SHIPPED = sorted(targets.PROFILE_DIR.glob("*.toml"))
REPO = Path(__file__).parents[1]
X86 = (targets.PROFILE_DIR / "x86-cpu.toml").read_text()


def test_there_are_shipped_targets():
    assert SHIPPED, "no targets/*.toml"
    assert targets.names() == [p.stem for p in SHIPPED]
    assert "x86-cpu" in targets.names()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_target_loads(path):
    t = targets.load(path.stem)
    assert t.name == path.stem, "a profile's name must be its file name, since it is looked up by file name"
    assert t.description
    assert t.runtime in targets.RUNTIMES and t.precision in targets.PRECISIONS
    assert t.activation_type in targets.QUANT_TYPES and t.weight_type in targets.QUANT_TYPES
    assert 13 <= t.opset <= 21 and t.threads >= 1 and t.batch and min(t.batch) >= 1
    assert all(v >= 0 for v in vars(t.budgets).values())
    assert t.source == str(path)
    # what the file says is what comes back, tables included
    raw = tomllib.loads(path.read_text())
    for key, value in raw.items():
        got = getattr(t, key)
        if key in targets.TABLES:
            assert {k: v for k, v in asdict(got).items() if k in value} == value, key
        else:
            assert (list(got) if isinstance(got, tuple) else got) == value, key
    json.dumps(t.to_dict())  # `targets show` prints it as JSON
    # loading the file by path gives the same target
    assert targets.load(str(path)) == t
    # every runtime's contract
    assert (t.tensorrt is not None) == (t.runtime == "tensorrt")
    assert set(t.execution_providers) <= set(targets.EXECUTION_PROVIDERS)
    assert (REPO / t.docker.dockerfile).is_file() and t.docker.platform in targets.PLATFORMS
    if t.tensorrt:
        assert max(t.batch) <= t.tensorrt.max_batch and t.tensorrt.min_batch <= min(t.batch)
        assert t.tensorrt.dla_core < 0 or t.tensorrt.min_batch == t.tensorrt.max_batch


def test_the_six_shipped_targets():
    assert targets.names() == ["jetson-agx-orin", "jetson-orin-nano", "mobile-arm64", "x86-cpu", "x86-nvidia",
                               "x86-openvino"]
    openvino = targets.load("x86-openvino")
    assert openvino.runtime == "openvino" and openvino.openvino.performance_hint == "LATENCY"
    assert targets.load("x86-cpu").openvino is None
    mobile = targets.load("mobile-arm64")
    assert mobile.runtime == "onnxruntime-mobile" and mobile.threads == 4
    assert mobile.execution_providers[0] == "XnnpackExecutionProvider"
    assert targets.load("jetson-agx-orin").tensorrt.dla_core == 0 and targets.load("jetson-agx-orin").tensorrt.gpu_fallback
    assert targets.load("jetson-orin-nano").tensorrt.dla_core == -1  # the Orin Nano has no DLA
    assert {targets.load(n).precision for n in ("jetson-orin-nano", "jetson-agx-orin")} == {"int8", "fp16"}
    assert targets.load("x86-nvidia").tensorrt.strongly_typed


def _user_toml(tmp_path: Path, text: str, name: str = "mine.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_user_toml_path_works(tmp_path):
    text = X86.replace('name = "x86-cpu"', 'name = "my-box"').replace("threads = 1", "threads = 4") \
        .replace("batch = [1, 64]", "batch = [1, 8, 32]").replace("min_speedup = 10.0", "min_speedup = 3")
    path = _user_toml(tmp_path, text)
    t = targets.load(path)
    assert (t.name, t.threads, t.batch, t.budgets.min_speedup) == ("my-box", 4, (1, 8, 32), 3.0)
    assert isinstance(t.budgets.min_speedup, float)
    assert t.source == path


def test_a_minimal_user_toml_gets_the_defaults(tmp_path):
    t = targets.load(_user_toml(tmp_path, 'name = "m"\ndescription = "d"\nruntime = "onnxruntime"\n'))
    assert t == targets.Target(name="m", description="d", runtime="onnxruntime", source=t.source)


@pytest.mark.parametrize("text, wrong, hint", [
    (X86.replace("threads = 1", "thread = 1"), "'thread'", "did you mean 'threads'?"),
    (X86.replace("per_channel = true", "per_chanel = true"), "'per_chanel'", "did you mean 'per_channel'?"),
    (X86.replace("max_accuracy_drop =", "max_acuracy_drop ="), "'max_acuracy_drop'",
     "did you mean 'max_accuracy_drop'?"),
], ids=["top-level", "top-level-2", "budgets"])
def test_unknown_key_suggests_the_nearest(tmp_path, text, wrong, hint):
    with pytest.raises(BadInput) as info:
        targets.load(_user_toml(tmp_path, text))
    message = str(info.value)
    assert "unknown key" in message and wrong in message and hint in message
    assert "mine.toml" in message


@pytest.mark.parametrize("old, new, valid", [
    ('runtime = "onnxruntime"', 'runtime = "coreml"', targets.RUNTIMES),
    ('platform = "linux/amd64"', 'platform = "linux/riscv64"', targets.PLATFORMS),
    ('execution_providers = ["CPUExecutionProvider"]', 'execution_providers = ["CpuProvider"]',
     targets.EXECUTION_PROVIDERS),
    ('precision = "int8"', 'precision = "int4"', targets.PRECISIONS),
    ('activation_type = "uint8"', 'activation_type = "fp8"', targets.QUANT_TYPES),
    ('graph_optimization_level = "all"', 'graph_optimization_level = "max"', targets.GRAPH_OPTIMIZATION_LEVELS),
])
def test_bad_choice_lists_the_valid_ones(tmp_path, old, new, valid):
    with pytest.raises(BadInput) as info:
        targets.load(_user_toml(tmp_path, X86.replace(old, new)))
    message = str(info.value)
    assert new.split(" = ")[1].strip('["]') in message
    assert all(choice in message for choice in valid)


@pytest.mark.parametrize("old, new, match", [
    ("min_speedup = 10.0", "min_speedup = -1.0", "must be a finite number >= 0"),
    ("max_accuracy_drop = 2.0", "max_accuracy_drop = -0.5", "must be a finite number >= 0"),
    ("threads = 1", "threads = 0", "threads must be >= 1"),
    ("threads = 1", "threads = -2", "threads must be >= 1"),
    ("threads = 1", "threads = 100000", "threads = 100000 is more than any device has; at most 1024"),
    ("batch = [1, 64]", "batch = [0, 64]", "batch sizes"),
    ("batch = [1, 64]", "batch = []", "non-empty list"),
    ("opset = 17", "opset = 9", "opset"),
    ("threads = 1", 'threads = "4"', "threads must be int"),
    ("threads = 1", "threads = true", "threads must be int"),
    ("min_speedup = 10.0", 'min_speedup = "fast"', "min_speedup must be float"),
    ("allow_spinning = true", 'allow_spinning = "no"', "allow_spinning must be bool"),
], ids=["negative-speedup", "negative-drop", "zero-threads", "negative-threads", "absurd-threads", "zero-batch",
        "empty-batch",
        "old-opset", "string-threads", "bool-threads", "string-budget", "string-spinning"])
def test_bad_values_are_refused(tmp_path, old, new, match):
    assert old in X86
    with pytest.raises(BadInput, match=match):
        targets.load(_user_toml(tmp_path, X86.replace(old, new)))


def test_nan_budget_is_refused(tmp_path):
    with pytest.raises(BadInput, match="min_speedup"):
        targets.load(_user_toml(tmp_path, X86.replace("min_speedup = 10.0", "min_speedup = nan")))


def test_missing_required_key(tmp_path):
    with pytest.raises(BadInput, match="missing required key 'runtime'"):
        targets.load(_user_toml(tmp_path, 'name = "m"\ndescription = "d"\n'))


def test_malformed_toml(tmp_path):
    with pytest.raises(BadInput, match="mine.toml"):
        targets.load(_user_toml(tmp_path, "name = \n"))


def test_unknown_target_name_suggests_the_nearest():
    with pytest.raises(BadInput, match="did you mean 'x86-cpu'"):
        targets.load("x86-cpus")


# --- the CLI --------------------------------------------------------------------------------------------------

def test_cli_targets_lists_every_target(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in targets.names():
        assert any(line.startswith(name + " ") and targets.load(name).description in line
                   for line in out.splitlines()), name


def test_cli_targets_show(capsys):
    assert main(["targets", "show", "x86-cpu"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "x86-cpu"
    assert shown == json.loads(json.dumps(targets.load("x86-cpu").to_dict()))


def test_cli_targets_show_a_user_toml(tmp_path, capsys):
    path = _user_toml(tmp_path, X86.replace('name = "x86-cpu"', 'name = "my-box"'))
    assert main(["targets", "show", path]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "my-box"


def test_cli_targets_show_unknown_is_one_error_line(capsys):
    assert main(["targets", "show", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown target 'nope'") and "Traceback" not in err


# --- runtime-specific tables ------------------------------------------------------------------------------------

NVIDIA = (targets.PROFILE_DIR / "x86-nvidia.toml").read_text()
AGX = (targets.PROFILE_DIR / "jetson-agx-orin.toml").read_text()


@pytest.mark.parametrize("text, old, new, match", [
    (NVIDIA, "workspace_mib = 2048", "workspace_mb = 2048", "did you mean 'workspace_mib'"),
    (NVIDIA, "workspace_mib = 2048", "workspace_mib = 0", "workspace_mib must be >= 1"),
    (NVIDIA, "dla_core = -1", "dla_core = -2", "dla_core must be -1"),
    (NVIDIA, "strongly_typed = true", 'strongly_typed = "yes"', "strongly_typed must be bool"),
    (NVIDIA, "opt_batch = 1", "opt_batch = 128", "min_batch <= opt_batch <= max_batch"),
    (NVIDIA, "max_batch = 64", "max_batch = 32", "must lie within the engine's profile"),
    (NVIDIA, 'timing_cache = "timing.cache"', 'timing_cache = "../cache"', "plain file name"),
    (AGX, "max_batch = 1", "max_batch = 4", "DLA needs a fixed shape"),
    (AGX, 'precision = "fp16"', 'precision = "fp32"', "DLA runs int8 or fp16 only"),
    (X86, 'precision = "int8"', 'precision = "fp16"', "fp16' needs runtime = 'tensorrt'"),
    (X86, "[budgets]", "[tensorrt]\nworkspace_mib = 1\n\n[budgets]", "a \\[tensorrt\\] table needs runtime"),
    (X86, 'base_image = "python:3.11.11-slim-bookworm"', 'base_image = "python:latest"', "pinned"),
    (X86, 'base_image = "python:3.11.11-slim-bookworm"', 'base_image = "python"', "pinned"),
    (X86, "[docker]", "[dockr]", "did you mean 'docker'"),
], ids=["typo", "workspace", "dla-core", "bool", "profile-order", "batch-over-profile", "cache-path", "dla-dynamic",
        "dla-fp32", "fp16-on-cpu", "tensorrt-table-on-cpu", "latest-tag", "untagged", "table-typo"])
def test_bad_runtime_tables_are_refused_with_the_fix(tmp_path, text, old, new, match):
    assert old in text
    with pytest.raises(BadInput, match=match):
        targets.load(_user_toml(tmp_path, text.replace(old, new)))


def test_a_user_tensorrt_toml_works(tmp_path):
    text = NVIDIA.replace('name = "x86-nvidia"', 'name = "my-gpu"').replace("workspace_mib = 2048",
                                                                           "workspace_mib = 4096")
    t = targets.load(_user_toml(tmp_path, text))
    assert t.name == "my-gpu" and t.tensorrt.workspace_mib == 4096 and t.tensorrt.max_batch == 64


def test_a_missing_toml_path_is_one_line(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        targets.load(str(tmp_path / "nope.toml"))


def test_cli_bad_target_toml_lists_the_valid_choices(tmp_path, capsys):
    path = _user_toml(tmp_path, X86.replace('runtime = "onnxruntime"', 'runtime = "onnx-runtime"'))
    assert main(["targets", "show", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(r in err for r in targets.RUNTIMES) and "did you mean 'onnxruntime'" in err
