"""A silent progress bar for quiet runs, tests and benchmarks: click.progressbar's interface, showing nothing."""
from __future__ import annotations

import sys


class NoBar:
    def __init__(self, items, label: str = "", length: int | None = None):
        self.items = items if items is not None else ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __iter__(self):
        return iter(self.items)

    def update(self, steps: int) -> None:
        pass


def bar(items, label: str, length: int | None = None, quiet: bool = False):
    """A click progress bar on stderr, or a NoBar when quiet or stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        return NoBar(items)
    import click

    return click.progressbar(items, length=length, label=label, file=sys.stderr, show_pos=True, show_eta=True)
