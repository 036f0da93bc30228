"""`edgecompress docker TARGET`: the docker build and run commands that finish and verify a run directory in the
target's image (docker/*.Dockerfile), and running them where a Docker engine answers.

The run directory is mounted at the same absolute path as on the host, and so are the files its run.toml names
(data, teacher, target profile), so the resolved config means the same inside the container. The container runs
with the caller's user id, so the files it writes stay the caller's. Export and verify run with --force: the run
directory's stages are up to date on the host, and the point is to redo them with the target's own runtime.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import edgecompress

from . import backends
from . import config as cfg
from .errors import BadInput, StageFailed

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def repository_root() -> Path:
    """The source checkout holding docker/ (the build context); an installed wheel has none."""
    root = Path(edgecompress.__file__).resolve().parent.parent
    if not (root / "docker").is_dir():
        raise BadInput("the Docker builds need the source repository (docker/ beside pipeline/): "
                       "run this from a clone of edgecompress")
    return root


def image_tag(target) -> str:
    return f"edgecompress-{target.name}:{edgecompress.__version__}"


def build_command(target, root: Path) -> list[str]:
    d = target.docker
    return ["docker", "build", "--platform", d.platform, "--build-arg", f"BASE_IMAGE={d.base_image}",
            "-f", str(root / d.dockerfile), "-t", image_tag(target), str(root)]


def _host_path(spec: str) -> Path | None:
    """The host path a run.toml entry names: a factory's folder (it may import its siblings), or the file itself;
    None for names (zoo models, fashion-mnist, shipped targets)."""
    file, sep, _ = spec.rpartition(":")
    path = Path(file).parent if sep and file.endswith(".py") else Path(spec)
    return path if spec and path.is_absolute() and path.exists() else None


def _run_config(run_dir: Path) -> cfg.RunConfig | None:
    path = run_dir / "run.toml"
    return cfg.from_dict(cfg.read_toml(path), str(path)) if path.is_file() else None


def mounts(run_dir: Path, config: cfg.RunConfig | None = None) -> list[Path]:
    """Host paths the container needs: the run directory and what its run.toml names."""
    paths = [run_dir]
    config = config or _run_config(run_dir)
    if config is None:
        return paths
    for spec in (config.data, config.teacher.spec, config.teacher.weights, config.distill.student, config.target):
        path = _host_path(spec)
        if path and path not in paths:
            paths.append(path)
    if config.data == "fashion-mnist":
        paths.append(FASHION_MNIST_DIR)
    return paths


def run_commands(target, run_dir: Path) -> list[list[str]]:
    run_dir = run_dir.resolve()
    base = ["docker", "run", "--rm", "--platform", target.docker.platform, "--user", f"{os.getuid()}:{os.getgid()}"]
    base += backends.for_target(target).docker_run_flags(target)  # device access: GPU, DLA, their groups
    config = _run_config(run_dir)
    for path in mounts(run_dir, config):
        base += ["-v", f"{path}:{path}" + ("" if path == run_dir else ":ro")]
    base.append(image_tag(target))
    # the user asks for these commands on their own run: the code its run.toml names is vouched for, by folder
    trust = []
    for folder in dict.fromkeys(f.parent for f in (config.code_files() if config else [])):
        trust += ["--trust", str(folder)]
    return [base + ["export", str(run_dir), "--force", *trust], base + ["verify", str(run_dir), "--force", *trust]]


def engine_answers() -> str:
    """"" when a Docker engine answers `docker info`, else why not."""
    if shutil.which("docker") is None:
        return "no docker command on PATH"
    try:
        result = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                                timeout=20)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 20 s"
    last_line = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    return "" if result.returncode == 0 else f"`docker info` failed: {last_line}"


def commands(target, run_dir: Path) -> list[list[str]]:
    return [build_command(target, repository_root()), *run_commands(target, run_dir)]


def run(all_commands: list[list[str]], echo) -> None:
    for command in all_commands:
        echo(f"+ {shlex.join(command)}")
        if subprocess.run(command).returncode != 0:
            raise StageFailed(f"`{shlex.join(command[:3])} ...` failed (its output is above)")
