"""A silent progress bar for quiet runs, tests and benchmarks: click.progressbar's interface, showing nothing."""
from __future__ import annotations


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
