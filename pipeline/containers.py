"""`edgecompress docker TARGET`: build the target's image (docker/*.Dockerfile) and finish and verify a run directory
in it, with Docker where an engine answers, else podman, else buildah; where none can, print Docker's commands.

The run directory is mounted at the same absolute path as on the host, and so are the files its run.toml names
(data, teacher, target profile), so the resolved config means the same inside the container. The container runs
with the caller's user id (`--user uid:gid` for all three tools), so the files it writes stay the caller's and the
run directory's 0600 files stay readable. Export and verify run with --force: the run directory's stages are up to
date on the host, and the point is to redo them with the target's own runtime.

buildah has no daemon and no `run IMAGE`: it builds with `buildah bud`, makes a working container of the image
(`buildah from`), runs the CLI in it (`buildah run CONTAINER -- edgecompress ...`) and removes it. It builds and runs
with chroot isolation (no OCI runtime or cgroups needed, as inside a CI container), or BUILDAH_ISOLATION where set;
its storage driver is its own setting (STORAGE_DRIVER=vfs where overlay cannot mount, e.g. on an overlayfs root).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import edgecompress

from . import backends
from . import config as cfg
from .errors import BadInput, StageFailed

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
TOOLS = ("docker", "podman", "buildah")  # in the order `edgecompress docker` looks for them
BUILD_ARG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def repository_root() -> Path:
    """The source checkout holding docker/ (the build context); an installed wheel has none."""
    root = Path(edgecompress.__file__).resolve().parent.parent
    if not (root / "docker").is_dir():
        raise BadInput("the Docker builds need the source repository (docker/ beside pipeline/): "
                       "run this from a clone of edgecompress")
    return root


def image_tag(target) -> str:
    return f"edgecompress-{target.name}:{edgecompress.__version__}"


def parse_build_args(pairs) -> dict[str, str]:
    """--build-arg NAME=VALUE pairs (VALUE may be empty: TORCH_INDEX_URL= takes torch from docker/wheels/ only)."""
    found = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not BUILD_ARG_NAME.fullmatch(name):
            raise BadInput(f"--build-arg {pair!r} is not NAME=VALUE (e.g. --build-arg TORCH_INDEX_URL=)")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise BadInput(f"--build-arg {name}: its value contains a control character (a newline?)")
        found[name] = value
    return found


def buildah_isolation() -> str:
    return os.environ.get("BUILDAH_ISOLATION") or "chroot"


def build_command(target, root: Path, tool: str = "docker", build_args: dict | None = None) -> list[str]:
    d = target.docker
    head = ["buildah", "bud", "--isolation", buildah_isolation()] if tool == "buildah" else [tool, "build"]
    args = {"BASE_IMAGE": d.base_image, **(build_args or {})}  # a --build-arg BASE_IMAGE=... replaces the profile's
    flags = [word for name, value in args.items() for word in ("--build-arg", f"{name}={value}")]
    return [*head, "--platform", d.platform, *flags, "-f", str(root / d.dockerfile), "-t", image_tag(target), str(root)]


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


def working_container(target) -> str:
    """buildah's working container for one `edgecompress docker` call (the process id keeps two calls apart)."""
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", f"edgecompress-{target.name}-{os.getpid()}")


def run_commands(target, run_dir: Path, tool: str = "docker") -> list[list[str]]:
    """The export and verify commands: `TOOL run --rm ... IMAGE STAGE` for docker and podman (the image's
    entrypoint is the CLI), `buildah run ... CONTAINER -- edgecompress STAGE` for buildah."""
    run_dir = run_dir.resolve()
    user = ["--user", f"{os.getuid()}:{os.getgid()}"]
    device = backends.for_target(target).docker_run_flags(target)  # device access: GPU, DLA, their groups
    config = _run_config(run_dir)
    volumes = []
    for path in mounts(run_dir, config):
        volumes += ["-v", f"{path}:{path}" + ("" if path == run_dir else ":ro")]
    if tool == "buildah":
        if device:
            raise BadInput(f"buildah cannot give a container {target.name}'s device ({shlex.join(device)}): "
                           "use Docker or podman with the NVIDIA Container Toolkit")
        base = ["buildah", "run", "--isolation", buildah_isolation(), *user, *volumes, working_container(target),
                "--", "edgecompress"]
    else:
        base = [tool, "run", "--rm", "--platform", target.docker.platform, *user, *device, *volumes, image_tag(target)]
    # the user asks for these commands on their own run: the code its run.toml names is vouched for, by folder
    trust = []
    for folder in dict.fromkeys(f.parent for f in (config.code_files() if config else [])):
        trust += ["--trust", str(folder)]
    return [base + ["export", str(run_dir), "--force", *trust], base + ["verify", str(run_dir), "--force", *trust]]


@dataclass
class Plan:
    """What `edgecompress docker` prints and, where `tool` is set, runs: build, then setup, the runs, and cleanup
    (whatever happened once setup ran)."""
    tool: str  # docker, podman or buildah; "" where none can run them (Docker's commands, printed only)
    build: list[str]
    runs: list[list[str]]
    setup: list[list[str]] = field(default_factory=list)
    cleanup: list[list[str]] = field(default_factory=list)
    why: str = ""  # why not Docker (or, with no tool, why none)

    def commands(self) -> list[list[str]]:
        return [self.build, *self.setup, *self.runs, *self.cleanup]


def _answers(command: list[str]) -> str:
    """"" when `command` (a tool's `info`) exits 0 within 20 s, else why not, in a few words."""
    if shutil.which(command[0]) is None:
        return f"no {command[0]} command on PATH"
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"`{command[0]} info` did not answer within 20 s"
    except OSError as exc:
        return f"`{command[0]} info` could not start: {exc.strerror}"
    last_line = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    return "" if result.returncode == 0 else f"`{command[0]} info` failed: {last_line}"


def engine_answers() -> str:
    """"" when a Docker engine answers `docker info`, else why not."""
    return _answers(["docker", "info", "--format", "{{.ServerVersion}}"])


def tool_answers(tool: str) -> str:
    """"" when `tool` can build and run images here, else why not: Docker needs its engine, podman its
    `podman info` to answer; buildah needs only its command."""
    if tool == "docker":
        return engine_answers()
    if tool == "podman":
        return _answers(["podman", "info", "--format", "{{.Version.Version}}"])
    return "" if shutil.which("buildah") else "no buildah command on PATH"


def choose_tool(target, wanted: str = "") -> tuple[str, str]:
    """(tool, why not the ones before it): `wanted` if given (StageFailed where it cannot run), else the first of
    TOOLS that answers and can give the container the target's device; ("", why none) where none can."""
    needs_device = bool(backends.for_target(target).docker_run_flags(target))
    if wanted:
        reason = tool_answers(wanted)
        if not reason and wanted == "buildah" and needs_device:
            reason = f"buildah cannot give a container {target.name}'s GPU"
        if reason:
            raise StageFailed(f"--tool {wanted}: {reason}")
        return wanted, ""
    reasons = []
    for tool in TOOLS:
        reason = tool_answers(tool)
        if not reason and tool == "buildah" and needs_device:
            reason = f"buildah is installed but cannot give a container {target.name}'s GPU"
        if not reason:
            return tool, "; ".join(reasons)
        reasons.append(reason)
    return "", "; ".join(reasons)


def plan(target, run_dir: Path, wanted: str = "", build_args: dict | None = None) -> Plan:
    tool, why = choose_tool(target, wanted)
    shown = tool or "docker"
    build = build_command(target, repository_root(), shown, build_args)
    runs = run_commands(target, run_dir, shown)
    if shown != "buildah":
        return Plan(tool, build, runs, why=why)
    container = working_container(target)
    setup = [["buildah", "from", "--pull=never", "--name", container, image_tag(target)]]
    return Plan(tool, build, runs, setup=setup, cleanup=[["buildah", "rm", container]], why=why)


def script(the_plan: Plan, target, run_dir: Path, dry_run: bool = False) -> list[str]:
    """The lines `edgecompress docker` prints: each command, safe to paste into a shell, and what happens to them."""
    base_image = next(w.partition("=")[2] for w in the_plan.build if w.startswith("BASE_IMAGE="))
    lines = [f"# with {the_plan.tool}" + (f" ({the_plan.why})" if the_plan.why else "")] if the_plan.tool else []
    lines += [f"# build the {target.name} image ({base_image}, {target.docker.platform})", shlex.join(the_plan.build),
              f"# export and verify {shlex.quote(str(run_dir))} with the target's runtime"]
    lines += [shlex.join(command) for command in the_plan.setup + the_plan.runs + the_plan.cleanup]
    if not the_plan.tool:
        lines.append(f"# not run here: {the_plan.why}; run the commands above where a Docker engine answers")
    elif dry_run:
        lines.append(f"# not run: --dry-run ({the_plan.tool} would run the commands above)")
    return lines


def _run_one(command: list[str], echo) -> None:
    echo(f"+ {shlex.join(command)}")
    if subprocess.run(command).returncode != 0:
        raise StageFailed(f"`{shlex.join(command[:3])} ...` failed (its output is above)")


def run(the_plan: Plan, echo) -> None:
    """Run the plan's commands in order, stopping at the first that fails; its cleanup runs once setup has."""
    _run_one(the_plan.build, echo)
    for command in the_plan.setup:
        _run_one(command, echo)
    try:
        for command in the_plan.runs:
            _run_one(command, echo)
    finally:
        for command in the_plan.cleanup:
            echo(f"+ {shlex.join(command)}")
            subprocess.run(command, stdout=subprocess.DEVNULL)
