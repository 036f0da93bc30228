import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecompress import config as cfg
from edgecompress import files
from edgecompress.runner import RunContext, Stage, is_done, run_stage


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "artifact.bin"
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half written")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_the_old_file_whole(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    files.write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def counting_stage(calls: list, setting: dict) -> Stage:
    def run(ctx: RunContext) -> Path:
        calls.append(1)
        out = ctx.stage_dir("demo") / "out.txt"
        files.write_text(out, f"made with {setting['value']}")
        return out

    return Stage("demo", run, lambda ctx: {"setting": dict(setting)})


def test_stage_skips_when_up_to_date_and_reruns_when_its_inputs_change(tmp_path):
    ctx = RunContext(tmp_path, cfg.RunConfig(), quiet=True)
    calls, setting = [], {"value": 1}
    stage = counting_stage(calls, setting)
    run_stage(ctx, stage)
    run_stage(ctx, stage)
    assert len(calls) == 1 and is_done(ctx, stage)
    setting["value"] = 2
    assert not is_done(ctx, stage)
    run_stage(ctx, stage)
    assert len(calls) == 2
    assert (tmp_path / "demo" / "out.txt").read_text() == "made with 2"


def test_a_tampered_artifact_or_done_record_makes_the_stage_rerun(tmp_path):
    ctx = RunContext(tmp_path, cfg.RunConfig(), quiet=True)
    calls = []
    stage = counting_stage(calls, {"value": 1})
    run_stage(ctx, stage)
    (tmp_path / "demo" / "out.txt").write_text("edited by hand")
    run_stage(ctx, stage)
    (tmp_path / "demo" / "done.json").write_text("{not json")
    run_stage(ctx, stage)
    assert len(calls) == 3
    assert json.loads((tmp_path / "demo" / "done.json").read_text())["artifact"] == "demo/out.txt"


def test_force_reruns_a_finished_stage(tmp_path):
    calls = []
    stage = counting_stage(calls, {"value": 1})
    run_stage(RunContext(tmp_path, cfg.RunConfig(), quiet=True), stage)
    run_stage(RunContext(tmp_path, cfg.RunConfig(), quiet=True, force=True), stage)
    assert len(calls) == 2


def test_run_toml_round_trips_through_the_config_loader(tmp_path):
    config = cfg.RunConfig(seed=7)
    config.distill.epochs = 3
    text = cfg.to_toml({**config.to_dict(), "versions": cfg.versions(), "host": cfg.host()})
    (tmp_path / "run.toml").write_text(text)
    loaded = cfg.from_dict(cfg.read_toml(tmp_path / "run.toml"), "run.toml")
    assert loaded == config


def test_config_refuses_unknown_keys_with_the_nearest_valid_one(tmp_path):
    from edgecompress.errors import BadInput

    with pytest.raises(BadInput, match="distill.epochs"):
        cfg.from_dict({"distill": {"epocs": 3}}, "c.toml")


def test_a_second_run_on_a_locked_directory_is_refused_and_a_dead_holder_releases_it(tmp_path):
    import subprocess
    import sys

    from edgecompress.errors import BadInput
    from edgecompress.runner import locked

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from edgecompress.runner import locked\n"
        f"with locked(Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BadInput, match=f"in use by process {holder.pid}"):
            with locked(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs in the holder
        holder.wait()
    with locked(tmp_path):  # the kernel released the dead process's lock
        pass


def test_target_name_cannot_escape_the_run_directory(tmp_path):
    from edgecompress import targets
    from edgecompress.errors import BadInput

    text = (Path(__file__).parents[1] / "targets" / "x86-cpu.toml").read_text()
    for bad in ("../../outside", "/abs", ".hidden", "a/b"):
        path = tmp_path / "t.toml"
        path.write_text(text.replace('name = "x86-cpu"', f'name = "{bad}"'))
        with pytest.raises(BadInput, match="must be letters, digits"):
            targets.load(str(path))


def test_digest_follows_file_content_not_file_name(tmp_path):
    """Resume and cache keys must change when a teacher's weights are replaced at the same path, and must not
    when the same weights are copied under another name."""
    from edgecompress.runner import digest

    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"first weights")
    before = digest({"teacher_weights": weights, "seed": 0})
    (tmp_path / "copy of teacher.pt").write_bytes(b"first weights")
    assert digest({"teacher_weights": tmp_path / "copy of teacher.pt", "seed": 0}) == before
    weights.write_bytes(b"other weights")
    assert digest({"teacher_weights": weights, "seed": 0}) != before


DIGEST_IN_A_FRESH_PROCESS = """
import sys
from pathlib import Path
from edgecompress.runner import digest
print(digest({"seed": 0, "options": {"view": "noise", "sigma": 0.5}, "classes": ["shirt", "coat"],
              "weights": Path(sys.argv[1])}))
"""


def test_digest_is_the_same_in_a_fresh_process_and_changes_with_any_input(tmp_path):
    """done.json keeps the digest for the next run, so a fresh interpreter (other string hash seeds) must compute
    the same one, whatever the order the dict's keys were inserted in (runner.digest hashes JSON with sorted
    keys); changing one value, one key, the order of a list or one byte anywhere in a file changes it."""
    import os
    import re
    import subprocess
    import sys

    from edgecompress.runner import digest

    weights = tmp_path / "teacher.pt"
    blob = bytearray(range(256)) * (3 * 4096)  # 3 MiB: more than one of the 1 MiB blocks files.sha256 reads
    weights.write_bytes(blob)
    deps = {"weights": weights, "classes": ["shirt", "coat"], "options": {"sigma": 0.5, "view": "noise"}, "seed": 0}
    here = digest(deps)
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # another string hash seed than this process's
    done = subprocess.run([sys.executable, "-c", DIGEST_IN_A_FRESH_PROCESS, str(weights)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": seed})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == here and re.fullmatch("[0-9a-f]{64}", here)

    changed = [{**deps, "seed": 1}, {**deps, "options": {"sigma": 0.5, "view": "downsample"}},
               {**deps, "classes": ["coat", "shirt"]}, {k if k != "seed" else "seeds": v for k, v in deps.items()},
               {k: v for k, v in deps.items() if k != "classes"}]
    digests = {digest(d) for d in changed}
    assert here not in digests and len(digests) == len(changed)
    blob[2 * (1 << 20) + 7] ^= 1  # one bit in the third block
    weights.write_bytes(blob)
    assert digest(deps) != here


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(st.characters(codec="utf-8"), min_size=1), st.text(st.characters(codec="utf-8")),
                       max_size=5))
def test_run_toml_holds_any_unicode_text(tmp_path_factory, table):
    """Class names, paths and options of any Unicode (emoji, control characters, DEL, quotes) are written to
    run.toml and read back unchanged."""
    path = tmp_path_factory.mktemp("toml") / "run.toml"
    data = {"splits": {"classes": list(table.values())}, "names": {f"k{i}": k for i, k in enumerate(table)}}
    files.write_text(path, cfg.to_toml(data))
    assert cfg.read_toml(path) == data
