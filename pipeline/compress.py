"""The whole pipeline: distill -> quantize -> export -> verify, each skipped when up to date."""
from __future__ import annotations

import json
from pathlib import Path

from . import distill, export, quantize, select, verify
from .errors import BadInput
from .modelcheck import check_classifier
from .runner import RunContext, Stage, is_done, run_stage, write_run_toml

STAGE_NAMES = ("distill", "quantize", "export", "verify")


def stages(ctx: RunContext) -> dict[str, Stage]:
    return {"distill": distill.STAGE, "quantize": quantize.STAGE, "export": export.stage(ctx), "verify": verify.STAGE}


def check_inputs(ctx: RunContext) -> None:
    """Fail fast on bad input, before any long work: target, data, teacher and student must fit together."""
    ctx.target  # noqa: B018  (loading validates)
    ctx.teacher  # noqa: B018  (loads the data too, and checks the teacher against it)

    check_classifier(distill.build_student(ctx), ctx.data, "student")


def compress(ctx: RunContext) -> dict:
    """Run every stage; returns report.json's content."""
    if ctx.config.distill.student == "auto":
        select.select_student(ctx)
    check_inputs(ctx)
    write_run_toml(ctx)
    for stage in stages(ctx).values():
        artifact = run_stage(ctx, stage)
    return json.loads(Path(artifact).read_text())


def run_one(ctx: RunContext, name: str) -> Path:
    """One stage against an existing run directory; its upstream stage must be finished. run.toml is written
    again first, so it names every setting the stage ran with (keys a newer edgecompress added, at their
    defaults) and the versions that ran it."""
    all_stages = stages(ctx)
    position = STAGE_NAMES.index(name)
    if position > 0:
        upstream = all_stages[STAGE_NAMES[position - 1]]
        if not is_done(ctx, upstream):
            raise BadInput(f"stage {name} needs {upstream.name} finished and up to date in {ctx.out}: "
                           f"run `edgecompress {STAGE_NAMES[position - 1]} {ctx.out}` first")
    write_run_toml(ctx)
    return run_stage(ctx, all_stages[name])
