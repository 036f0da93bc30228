"""The command line: it only builds a RunConfig and calls the library."""
from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path

import click

from . import __version__
from . import config as cfg
from .errors import BadInput, EdgeError, StageFailed

DEFAULTS = cfg.RunConfig()
# compress's options and the RunConfig fields they set
FLAG_FIELDS = {"data": ("data",), "target": ("target",), "seed": ("seed",), "student": ("distill", "student"),
               "epochs": ("distill", "epochs"), "method": ("distill", "method"),
               "skip_bad_images": ("skip_bad_images",), "max_latency_ms": ("max_latency_ms",),
               "input_size": ("preprocess", "size"), "resize": ("preprocess", "resize"),
               "interpolation": ("preprocess", "interpolation"), "mean": ("preprocess", "mean"),
               "std": ("preprocess", "std"), "channels": ("preprocess", "channels")}


def _numbers(ctx, param, value):
    """--mean/--std: comma-separated numbers, one per channel."""
    if value is None:
        return []
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def _or_empty(ctx, param, value):
    return value or ""


def _size(ctx, param, value):
    from .data.preprocess import parse_size

    try:
        size = parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return list(size) if size else []


def teachers_from_flags(teachers: tuple[str, ...], weights: tuple[str, ...]) -> cfg.TeacherConfig:
    """--teacher given N times and --teacher-weights given 0 or N times pair by position ('-': none)."""
    if weights and len(weights) != len(teachers):
        raise click.UsageError(f"{len(teachers)} --teacher but {len(weights)} --teacher-weights: give "
                               "--teacher-weights once per --teacher, in the same order ('-' for a teacher "
                               "without weights), or not at all")
    weights = [("" if w == "-" else w) for w in weights] or [""] * len(teachers)
    return cfg.TeacherConfig(teachers[0], weights[0], list(teachers[1:]),
                             list(weights[1:]) if any(weights[1:]) else [])


def method_opts_from_flags(pairs: tuple[str, ...]) -> dict:
    opts = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"--method-opt {pair!r} is not key=value (e.g. --method-opt temperature=2)")
        opts[key.strip()] = value
    return opts


def common(f):
    f = click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="No progress bars or stage messages.")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="edgecompress")
def cli():
    """Distil a large PyTorch teacher into a small student, quantize it to int8, export it for a device
    target and verify it against the teacher, in one run directory."""


@cli.command()
@click.option("--teacher", multiple=True, default=[DEFAULTS.teacher.spec], show_default=True,
              help="Teacher: a zoo name, a TorchScript file, an ONNX file (logit-based methods), or "
                   "path/to/file.py:factory (runs that file's code). Repeat for several teachers (multi-teacher); "
                   "the first is the one verify compares against.")
@click.option("--teacher-weights", multiple=True, metavar="CKPT",
              help="State dict for a zoo or factory teacher, loaded with weights_only=True; with several --teacher, "
                   "give it once per --teacher in the same order, '-' for none.  "
                   "[default: shipped weights for zoo teachers on fashion-mnist]")
@click.option("--student", default=DEFAULTS.distill.student, show_default=True,
              help="Student: a zoo name (see `edgecompress models`), path/to/file.py:factory, or `auto`: the "
                   "largest zoo student whose int8 artifact, timed here, fits --max-latency-ms.")
@click.option("--max-latency-ms", type=float, default=DEFAULTS.max_latency_ms, metavar="MS",
              help="Batch-1 p50 budget for the artifact; overrides the target's max_latency_ms (0: keep it).")
@click.option("--data", default=DEFAULTS.data, show_default=True,
              help="fashion-mnist, an image folder (one sub-folder per class), an .npz with x/y, or an IDX folder.")
@click.option("--target", default=DEFAULTS.target, show_default=True,
              help="Device target name (see `edgecompress targets`) or a target .toml file.")
@click.option("--out", default="runs/default", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory; every output is written inside it.")
@click.option("--epochs", default=DEFAULTS.distill.epochs, show_default=True, type=int, help="Distillation epochs.")
@click.option("--method", default=DEFAULTS.distill.method, show_default=True,
              help="Distillation method (see `edgecompress methods`).")
@click.option("--method-opt", "method_opt", multiple=True, metavar="KEY=VALUE",
              help="A method option, e.g. temperature=2 or student_layers=stages.1,stages.2; repeatable; "
                   "wins over the config file's [distill.method_opts].")
@click.option("--seed", default=DEFAULTS.seed, show_default=True, type=int, help="Seed for splits, init and order.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A TOML file with any of run.toml's tables ([teacher], [distill], [quantize], [verify]); "
                   "options given on the command line win.")
@click.option("--input-size", callback=_size, metavar="S|HxW",
              help="Input size the teacher was trained at, e.g. 224 or 224x160 (height x width).  "
                   "[default: the teacher's, else the data's]")
@click.option("--resize", type=int, default=-1, metavar="PX",
              help="Shorter side before a center crop to --input-size (e.g. 256 for 224); 0: resize straight to "
                   "the size.  [default: the teacher's, else 0]")
@click.option("--interpolation", type=click.Choice(["bilinear", "bicubic", "nearest"]), callback=_or_empty,
              help="Resize interpolation.  [default: the teacher's, else bilinear]")
@click.option("--mean", callback=_numbers, metavar="M[,M,M]",
              help="Per-channel mean of [0, 1] pixels the teacher was trained with, e.g. 0.485,0.456,0.406.  "
                   "[default: the teacher's, else measured on the data]")
@click.option("--std", callback=_numbers, metavar="S[,S,S]", help="Per-channel std, e.g. 0.229,0.224,0.225.")
@click.option("--channels", type=click.Choice(["rgb", "grey"]), callback=_or_empty,
              help="Channels the teacher takes (grey data is repeated to RGB).  [default: the teacher's, else the "
                   "data's]")
@click.option("--skip-bad-images", is_flag=True,
              help="Leave unreadable files of an image folder out (and count them) instead of stopping.")
@click.option("--force", is_flag=True, help="Rerun every stage even when up to date.")
@common
@click.pass_context
def compress(click_ctx, teacher, teacher_weights, student, max_latency_ms, data, target, out, epochs, method,
             method_opt, seed, config_file, input_size, resize, interpolation, mean, std, channels, skip_bad_images,
             force, quiet, debug):
    """Run distill, quantize, export and verify; exit 1 if a target budget is missed."""
    from .compress import compress as run_all
    from .runner import RunContext, locked

    config = cfg.from_dict(cfg.read_toml(config_file), str(config_file)) if config_file else cfg.RunConfig()
    for param, path in FLAG_FIELDS.items():
        if config_file is None or click_ctx.get_parameter_source(param) != click.core.ParameterSource.DEFAULT:
            setattr(functools.reduce(getattr, path[:-1], config), path[-1], click_ctx.params[param])
    teacher_given = click_ctx.get_parameter_source("teacher") != click.core.ParameterSource.DEFAULT
    if config_file is None or teacher_given or teacher_weights:
        specs = teacher if teacher_given or config_file is None else (config.teacher.spec, *config.teacher.extra)
        config.teacher = teachers_from_flags(specs, teacher_weights)
    config.distill.method_opts = {**config.distill.method_opts, **method_opts_from_flags(method_opt)}
    config = config.resolve_paths().validate()
    ctx = RunContext(out, config, quiet=quiet, force=force)
    with locked(out):
        report = run_all(ctx)
    _summarise(report, out, quiet)
    fail_on_missed_budget(report, out)


def fail_on_missed_budget(report: dict, out: Path) -> None:
    """A missed budget is a failure (exit 1) naming each budget, for `compress` and `verify` alike."""
    if not report["budgets"]["passed"]:
        raise StageFailed(f"budget missed for {report['target']}: {'; '.join(report['budgets']['failed'])} "
                          f"(see {out / 'verify' / 'report.md'})")


def _summarise(report: dict, out: Path, quiet: bool) -> None:
    if quiet:
        return
    t, a = report["teacher"], report["artifact"]
    click.echo(f"teacher top-1 {t['accuracy'] * 100:.2f}%  artifact top-1 {a['accuracy'] * 100:.2f}%  "
               f"agreement {a['agreement'] * 100:.2f}%  speedup {report['speedup_vs_teacher']:.1f}x  "
               f"size ratio {report['size_ratio']:.1f}x")
    if a.get("measured_with"):
        click.echo(f"artifact measured with {a['runtime']} on this host, not with {report['target']}'s runtime")
    if report["unverified"]:
        click.echo(f"not verified here: {len(report['unverified'])} item(s), listed in the report")
    click.echo(f"report: {out / 'verify' / 'report.md'}")


def check_trusted(config: cfg.RunConfig, run_dir: Path, trusted: tuple[Path, ...]) -> None:
    """A run directory's run.toml is not the user's own command line: the code it names (factory files,
    TorchScript teachers, view functions) runs only from inside a folder the user vouches for with --trust."""
    roots = [t.resolve() for t in trusted]
    untrusted = [f for f in config.code_files() if not any(f == r or r in f.parents for r in roots)]
    if untrusted:
        names = ", ".join(str(f) for f in untrusted)
        raise BadInput(f"{run_dir}/run.toml names code this command would run: {names}; run it only if you trust "
                       f"that code: add --trust {untrusted[0].parent}")


def _stage_command(name: str, summary: str):
    @cli.command(name, help=f"{summary} in an existing run directory (made by `compress`).")
    @click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
    @click.option("--force", is_flag=True, help="Rerun even when up to date.")
    @click.option("--trust", multiple=True, type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                  help="A folder whose Python and TorchScript files run.toml may name (factory files, TorchScript "
                       "teachers): without it, a run directory that names code is refused. Repeatable.")
    @common
    def command(run_dir, force, trust, quiet, debug):
        from .compress import run_one
        from .runner import RunContext, locked, open_run, rank

        quiet = quiet or rank() != 0  # under torchrun, rank 0 speaks for the job

        config = open_run(run_dir)
        check_trusted(config, run_dir, trust)
        ctx = RunContext(run_dir, config, quiet=quiet, force=force)
        with locked(run_dir):
            artifact = run_one(ctx, name)
        if not quiet:
            click.echo(str(artifact))
        if name == "verify":
            fail_on_missed_budget(json.loads(artifact.read_text()), run_dir)

    return command


for _name, _summary in (("distill", "Distil the student"), ("quantize", "Quantize the distilled student to int8"),
                        ("export", "Export the int8 model for the run's target"),
                        ("verify", "Verify the artifact against the teacher")):
    _stage_command(_name, _summary)


@cli.command()
@click.argument("new_report", type=click.Path(path_type=Path))
@click.option("--baseline", required=True, type=click.Path(path_type=Path), metavar="OLD_REPORT",
              help="The report.json to compare with (e.g. the last release's).")
@click.option("--max-accuracy-drop", default=1.0, show_default=True, type=float, metavar="PT",
              help="Fail when the artifact's top-1 falls by more than this many points.")
@click.option("--max-latency-increase", default=10.0, show_default=True, type=float, metavar="PCT",
              help="Fail when an artifact p50 rises by more than this percentage and beyond the measured noise.")
@common
def check(new_report, baseline, max_accuracy_drop, max_latency_increase, quiet, debug):
    """Compare NEW_REPORT (a report.json) with --baseline; exit 1 on a regression, for CI gates."""
    from .check import Thresholds, check as compare_reports

    outcome = compare_reports(new_report, baseline, Thresholds(max_accuracy_drop, max_latency_increase))
    for line in [f"REGRESSION: {r}" for r in outcome.regressions] if quiet else [outcome.text()]:
        click.echo(line)
    return 0 if outcome.passed else 1


@cli.group(invoke_without_command=True)
@click.pass_context
def targets(ctx):
    """List the shipped device targets; `targets show NAME` prints one."""
    if ctx.invoked_subcommand is None:
        from edgecompress import targets as profiles

        for name in profiles.names():
            click.echo(f"{name:20s} {profiles.load(name).description}")


@targets.command("show")
@click.argument("name")
def targets_show(name):
    """Print a target profile (a shipped name or a .toml path), resolved."""
    from edgecompress import targets as profiles

    click.echo(json.dumps(profiles.load(name).to_dict(), indent=2))


@cli.command("docker")
@click.argument("target")
@click.option("--run-dir", default="runs/default", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="The run directory (made by `compress --target TARGET`) the container finishes and verifies.")
@click.option("--tool", type=click.Choice(["docker", "podman", "buildah"]),
              help="Build and run with this tool.  [default: Docker where an engine answers, else podman, else "
                   "buildah; none: print Docker's commands]")
@click.option("--build-arg", "build_args", multiple=True, metavar="NAME=VALUE",
              help="A build argument of the Dockerfile, repeatable: BASE_IMAGE, TORCH_INDEX_URL (empty: torch only "
                   "from the wheels in docker/wheels/), PIP_INDEX_URL.")
@click.option("--dry-run", is_flag=True, help="Print the commands the chosen tool would run; run nothing.")
@common
def docker_command(target, run_dir, tool, build_args, dry_run, quiet, debug):
    """Build TARGET's image (docker/*.Dockerfile) and export and verify RUN_DIR in it with the target's runtime:
    with Docker where an engine answers, else podman, else buildah (no daemon needed). Prints the commands first;
    where no tool can run them, prints Docker's and stops."""
    from edgecompress import targets as profiles

    from . import containers

    profile = profiles.load(target)
    if any(ord(c) < 32 or ord(c) == 127 for c in str(run_dir)):
        # the printed lines are meant to be pasted into a shell: a newline in a path would start a command
        raise BadInput(f"--run-dir {str(run_dir)!r} contains a control character (a newline?); rename the folder")
    if (run_dir / "run.toml").is_file():
        made_for = profiles.load(cfg.read_toml(run_dir / "run.toml").get("target", "")).name
        if made_for != profile.name:
            raise BadInput(f"{run_dir} was made for target {made_for}, not {profile.name}: "
                           f"use `edgecompress docker {made_for} --run-dir {run_dir}`")
    plan = containers.plan(profile, run_dir, tool or "", containers.parse_build_args(build_args))
    for line in containers.script(plan, profile, run_dir, dry_run):
        click.echo(line)
    if plan.tool and not dry_run:
        containers.run(plan, click.echo)
        click.echo(f"# exported and verified in {containers.image_tag(profile)}, built and run with {plan.tool}")
    return 0


@cli.command()
@click.option("--input-size", callback=_size, metavar="S|HxW",
              help="Measure the students --student auto considers at this size (e.g. 224): parameters, MACs, "
                   "the target's artifact latency at batch 1 on this host, and its int8 kernel coverage.")
@click.option("--target", default=DEFAULTS.target, show_default=True, help="Target whose artifact is timed.")
@click.option("--num-classes", default=1000, show_default=True, type=click.IntRange(2, 100000),
              help="Classifier outputs of the measured students.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def models(input_size, target, num_classes, quiet):
    """List the model zoo, or measure it at an input size."""
    from edgecompress import targets as target_profiles
    from edgecompress.models import ZOO, libraries

    if not input_size:
        for entry in ZOO.values():
            click.echo(f"{entry.name:32s} {entry.family:14s} {entry.description}")
        state = "installed" if libraries.available() else f"not installed: {libraries.INSTALL_HINT}"
        for name in libraries.PHOTO_STUDENTS:
            click.echo(f"{name:32s} {'photo student':14s} {name.partition(':')[0]} architecture (vision extra, {state})")
        click.echo("any torchvision:NAME or timm:NAME classification model is accepted as teacher or student")
        return 0
    from . import select
    from .progress import bar

    size = tuple(input_size)  # _size gives (height, width)
    profile = target_profiles.load(target)
    rows = select.zoo_at(size, profile, num_classes, DEFAULTS.seed,
                         lambda items, label, length=None: bar(items, label, length, quiet))
    click.echo(f"{size[0]}x{size[1]} RGB, {num_classes} classes, {profile.name} artifact at batch 1, "
               f"{profile.threads} thread(s), on this host")
    click.echo(f"{'model':32s} {'params':>10s} {'MMACs':>8s} {'p50 ms':>8s}  int8 layers  float between int8")
    for r in rows:
        dequantized = ", ".join(f"{op} x{n}" for op, n in r.get("dequantized_ops", {}).items()) or "-"
        click.echo(f"{r['name']:32s} {r['params']:>10,} {r['macs'] / 1e6:>8.1f} {r['p50_ms']:>8.3f}  "
                   f"{r.get('int8_layers', 0):>4d}/{r.get('int8_layers', 0) + r.get('float_layers', 0):<6d} {dequantized}")
    if not libraries.available():
        click.echo(f"torchvision's and timm's photo students are not listed: {libraries.INSTALL_HINT}")
    return 0


@cli.command()
def methods():
    """List the distillation methods: family, paper, options with their defaults."""
    from .distill import methods as distillers

    for cls in distillers.METHODS.values():
        opts = " ".join(f"{k}={','.join(v) if isinstance(v, list) else f'{v:g}' if isinstance(v, float) else v}"
                        for k, v in distillers.options(cls).items())
        click.echo(f"{cls.name:14s} {cls.family:14s} {cls.paper:32s} {opts or '-'}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        result = cli.main(args=argv, prog_name="edgecompress", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.NoArgsIsHelpError as exc:  # a bare group: show its help
        click.echo(exc.ctx.get_help())
        return 0
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "edgecompress"
        click.echo(f"error: {exc.format_message()} (see `{where} --help`)", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("interrupted: finished stages and epochs are kept; rerun the same command to resume", err=True)
        return 130
    except EdgeError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except SystemExit as exc:  # click's own exits come back as return values here: this one is a model's code
        if debug:
            traceback.print_exc()
        click.echo(f"error: model code called sys.exit({exc.code!r}) while it ran; the run stopped", err=True)
        return 1
    except BaseException as exc:  # the last resort: one line, the traceback only on --debug
        if debug:
            traceback.print_exc()
        click.echo(f"error: internal failure: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                   err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
