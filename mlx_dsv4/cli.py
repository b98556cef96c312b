"""The `dsv4` command line: one typer app, one function per command.

Commands parse their options, call one library function and render the result; nothing else.
Library imports happen inside each command so `dsv4 --help` does not load MLX. Errors the
library explains (bad checkpoint, full disk, unsupported config) print as one line, exit code 1.
To add a command, add a decorated function here that calls the library.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import typer

app = typer.Typer(name="dsv4", help="Run DeepSeek-V4 (Flash and Pro) locally with MLX.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# The names of convert.plan.RECIPES, spelled out so `--help` needs no import (a test checks them).
Recipe = Literal["q4", "native", "q8"]
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '4GiB' or a byte count."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise typer.BadParameter(f"{text!r} is not a size like 5GB, 500MB or 4GiB.")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@app.callback()
def main() -> None:
    """Run DeepSeek-V4 (Flash and Pro) locally with MLX."""


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="Checkpoint directory or Hugging Face repo id, "
                                               "e.g. deepseek-ai/DeepSeek-V4-Flash.")],
    output_dir: Annotated[Path, typer.Argument(help="New or empty directory for the MLX model.")],
    recipe: Annotated[Recipe, typer.Option(help="q4: 4-bit linears, experts kept as shipped "
                                                "(default); native: lossless; q8: 8-bit linears.")] = "q4",
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit of a Hub repo.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, write nothing.")] = False,
    shard_size: Annotated[int, typer.Option(parser=parse_size, metavar="SIZE",
                                            help="Largest output shard, e.g. 5GB.")] = "5GB",
) -> None:
    """Convert an official FP8/FP4 checkpoint to MLX shards; rerun the same command to resume."""
    from rich.console import Console

    from .config import ConfigError
    from .convert import ConvertError
    from .convert import convert as run
    from .hub import HubError

    console = Console()
    try:
        with _progress_bar(console, not dry_run) as report:
            result = run(source, output_dir, recipe=recipe, revision=revision, dry_run=dry_run,
                         shard_size=shard_size, progress=report)
    except (ConvertError, HubError, ConfigError) as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1)
    if dry_run:
        console.print(_plan_table(source, result))
    elif not result.written:
        console.print(f"{result.output} already holds this conversion.", highlight=False)
    else:
        reused = f", kept {len(result.reused)} from an earlier run" if result.reused else ""
        console.print(f"Wrote {len(result.written)} shard(s){reused} to {result.output} "
                      f"in {result.seconds:.0f} s.", highlight=False)


class _progress_bar:
    """One rich bar over source bytes, labelled with the current shard; silent off a terminal.

    The bar starts with the first converted tensor, so it never overlaps the download's own bars.
    """

    def __init__(self, console, enabled: bool):
        self.console, self.enabled, self.bar = console, enabled and console.is_terminal, None

    def __enter__(self):
        return self.update if self.enabled else None

    def update(self, p) -> None:
        if self.bar is None:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task(p.shard, total=p.total)
            self.bar.start()
        self.bar.update(self.task, completed=p.done, description=p.shard)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()


def _plan_table(source: str, result):
    from rich.table import Table

    plan = result.plan
    table = Table(title=f"dsv4 convert {source} — recipe {plan.recipe.name}: {plan.recipe.summary}",
                  show_header=True)
    table.add_column("")
    table.add_column("in", justify="right")
    table.add_column("out", justify="right")
    table.add_row("tensors", f"{len(plan.source.tensors):,}", f"{len(plan.targets):,}")
    table.add_row("bytes", _size(plan.bytes_in), _size(plan.bytes_out))
    table.add_row("shards", f"{len({h.shard for h in plan.source.tensors.values()})}",
                  f"{len(plan.shards)}")
    download = f" (incl. download up to {_size(result.download_bytes)})" if result.download_bytes else ""
    table.add_row("disk needed", "", _size(result.disk_bytes) + download)
    table.add_row("peak memory", "", f"{_size(plan.peak_bytes)} + interpreter")
    return table


def _size(n: int) -> str:
    if n < 10**9:
        return f"{n / 1e6:,.1f} MB"
    return f"{n / 1e9:,.2f} GB ({n / 2**30:,.2f} GiB)"
