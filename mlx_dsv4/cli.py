"""The `dsv4` command line: one typer app, one function per command.

Commands parse their options, call one library function and render the result; nothing else.
Only typer and rich are imported here at module level: library imports (MLX, the server,
prompt_toolkit) happen inside each command, so `dsv4 --help` and each command's first output
come fast. Every command is registered with `@command()`: a failure the library explains (a bad
checkpoint, a full disk, an unreadable config: its ValueErrors and OSErrors) prints as one
`Error:` line and exits 1; anything else is a bug and prints one line too, with a pointer to
DSV4_DEBUG=1 for the traceback; Ctrl-C exits 130 with one line. To add a command, decorate a
function with `@command()` and call the library from it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Literal

import typer
from typer.core import TyperCommand, TyperGroup


class _Usage:
    """Help that reads like a man page: `dsv4 chat [OPTIONS] MODEL`, flags without a type.

    (typer 0.2x prints required arguments as `{model}` and every flag as `<bool>`.)
    """

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                name = (p.metavar or p.name).upper()
                pieces.append(name if p.required else f"[{name}]")
        return pieces + ([self.subcommand_metavar] if isinstance(self, TyperGroup) else [])

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and not getattr(p, "count", False):
                p.metavar = ""
        return params


class _Command(_Usage, TyperCommand):
    pass


class _Group(_Usage, TyperGroup):
    pass


app = typer.Typer(name="dsv4", help="Run DeepSeek-V4 (Flash and Pro) locally with MLX.", cls=_Group,
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# The names of convert.plan.RECIPES, spelled out so `--help` needs no import (a test checks them).
Recipe = Literal["attn4", "q4", "native", "native-h8", "q8", "experts3", "experts2"]


def command(interrupted: str = "Interrupted."):
    """`app.command()` whose failures print one line (see the module docstring)."""

    def register(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort, typer.BadParameter):
                raise  # typer's own exits and usage errors (exit 2) keep their format
            except KeyboardInterrupt:
                raise _fail(interrupted, code=130, prefix="") from None
            except Exception as e:
                if os.environ.get("DSV4_DEBUG"):
                    raise
                raise _fail(_message(e)) from None

        return app.command(cls=_Command)(run)

    return register


def _message(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:  # "path: reason", without Python's "[Errno n]"
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if isinstance(e, (OSError, ValueError)):  # the library's own errors are ValueErrors
        return str(e)
    # A bug, not bad input: say what it was, and how to see where.
    return f"{type(e).__name__}: {e} (unexpected; rerun with DSV4_DEBUG=1 for the traceback)"


def parse_size(text: str) -> int:
    """A file size option ('5GB' = 5e9, '4GiB'), as plan.parse_size reads it, for typer."""
    return _size_option(text, decimal=True)


def parse_memory(text: str) -> int:
    """A machine's memory ('256GB' = 256 GiB, as Apple quotes RAM), for typer."""
    return _size_option(text, decimal=False)


def parse_expert_memory(text: str) -> int | str:
    """--expert-memory: a size ('20GB' = 20 GiB) or 'auto' (the planner sizes the cache)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _size_option(text, decimal=False)
    except typer.BadParameter as e:
        raise typer.BadParameter(f"{e} Or 'auto'.") from None


def _size_option(text: str, decimal: bool) -> int:
    from .sizes import parse_size as parse  # sizes.py imports no MLX at module level

    try:
        size = parse(text, decimal=decimal)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if size < 1:
        raise typer.BadParameter(f"{text!r} is not a positive size.")
    return size


def _fail(message, code: int = 1, prefix: str = "Error: ") -> typer.Exit:
    from rich.console import Console
    from rich.markup import escape

    # soft_wrap: paths and commands in the message must stay copyable on one line
    Console(stderr=True, soft_wrap=True).print(f"[red]{prefix}[/red]{escape(str(message))}",
                                               highlight=False)
    return typer.Exit(code)


def _print_version(asked: bool) -> None:
    if asked:
        from . import __version__

        print(f"mlx-dsv4 {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Run DeepSeek-V4 (Flash and Pro) locally with MLX."""


@command(interrupted="Interrupted: rerun the same command to resume.")
def convert(
    source: Annotated[str, typer.Argument(help="Checkpoint directory or Hugging Face repo id, "
                                               "e.g. deepseek-ai/DeepSeek-V4-Flash.")],
    output_dir: Annotated[Path, typer.Argument(help="New or empty directory for the MLX model.")],
    recipe: Annotated[Recipe, typer.Option(help="attn4 (default): big attention matrices 4-bit, "
                                                "the rest exact; q4: smallest 4-bit; native: "
                                                "lossless; experts3/experts2: 3/2-bit experts for "
                                                "128/96 GB Macs. `dsv4 plan` compares them.")] = "attn4",
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit of a Hub repo.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, write nothing.")] = False,
    shard_size: Annotated[int, typer.Option(parser=parse_size, metavar="SIZE",
                                            help="Largest output shard, e.g. 5GB.")] = "5GB",
) -> None:
    """Convert an official FP8/FP4 checkpoint to MLX shards; rerun the same command to resume."""
    from rich.console import Console

    from .convert import convert as run

    console = Console()
    with _progress_bar(console, not dry_run) as report:
        result = run(source, output_dir, recipe=recipe, revision=revision, dry_run=dry_run,
                     shard_size=shard_size, progress=report)
    if dry_run:
        from .plan_report import convert_table

        console.print(convert_table(source, result))
    elif not result.finished:
        console.print(f"{result.output} already holds this conversion.", highlight=False,
                      soft_wrap=True)
    elif not result.written:  # an earlier run wrote every shard and stopped before the end
        console.print(f"Completed the conversion in {result.output}: the {len(result.reused)} "
                      "shard(s) an earlier run wrote are kept, the index is written now.",
                      highlight=False, soft_wrap=True)
    else:
        reused = f", kept {len(result.reused)} from an earlier run" if result.reused else ""
        console.print(f"Wrote {len(result.written)} shard(s){reused} to {result.output} "
                      f"in {result.seconds:.0f} s.", highlight=False, soft_wrap=True)
        if result.plan.dropped:
            from .convert import dropped_note

            console.print(f"Note: {dropped_note(result.plan)}.", highlight=False, soft_wrap=True)


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


Model = Annotated[str, typer.Argument(help="Converted model directory, or the Hugging Face id "
                                           "it was converted from (looked up in $DSV4_MODELS).")]
PrefillChunk = Annotated[int, typer.Option(min=1, metavar="TOKENS",
                                          help="Prompt tokens per prefill step.")]
Context = Annotated[int | None, typer.Option("--max-context", metavar="TOKENS", min=1,
                                             help="Context to plan for; default: the largest "
                                                  "that fits this machine.")]
Draft = Annotated[int | None, typer.Option(
    "--draft", min=0, max=8, metavar="N",
    help="Tokens the checkpoint's MTP block drafts per step for speculative decoding (same "
         "output, fewer forwards); 0 turns it off. Default: 1 on a GPU when the checkpoint "
         "has an MTP block, 0 on the CPU (where it does not pay).")]
NoMtp = Annotated[bool, typer.Option("--no-mtp", help="No speculative decoding (as --draft 0).")]
ExpertMemory = Annotated[int | None, typer.Option(
    parser=parse_expert_memory, metavar="SIZE",
    help="Keep the routed experts on disk and read them on demand into a cache of this size, "
         "e.g. 24GB (for Macs too small for the whole model); 'auto': what the plan leaves.")]
KvBits = Annotated[int | None, typer.Option("--kv-bits", metavar="BITS", help="8 stores the compressed KV and "
                                                               "index pools in 8 bits (half the bytes); "
                                                               "4 (V4.1 only) in the official FP4 formats.")]


def parse_size_or_zero(text: str) -> int:
    """A size option where 0 turns the thing off."""
    return 0 if text.strip() == "0" else _size_option(text, decimal=True)


CacheBytes = Annotated[int, typer.Option(
    "--prompt-cache-bytes", parser=parse_size_or_zero, metavar="SIZE",
    help="Memory for the decode states of recent prompts, reused by any later prompt that "
         "starts with one (least recently used go first); 0 keeps none.")]
CacheDir = Annotated[Path | None, typer.Option(
    "--prompt-cache-dir", metavar="DIR", help="Folder for the states of long prompts, reused "
                                              "after a restart: a new or empty folder the cache "
                                              "keeps to itself (one holding other files is "
                                              "refused); default: ~/.cache/mlx-dsv4/prompt-cache.")]
CacheDiskBytes = Annotated[int, typer.Option(
    "--prompt-cache-disk-bytes", parser=parse_size_or_zero, metavar="SIZE",
    help="Most the folder holds (least recently used go first); 0 writes nothing.")]
NoCache = Annotated[bool, typer.Option("--no-prompt-cache", help="Keep no prompt states, in memory "
                                                                 "or on disk.")]


def _prompt_cache(max_bytes: int, directory: Path | None, disk_bytes: int, off: bool) -> dict | None:
    """The prompt cache options as `open_prompt_cache` takes them (None: no prompt cache)."""
    if off:
        return None
    if directory is None:
        from .generation.cache_folder import default_dir  # imports no MLX

        directory = default_dir()
    return {"max_bytes": max_bytes, "directory": directory, "disk_bytes": disk_bytes}


def _pipeline(model: str, expert_memory, max_context, kv_bits, prefill_chunk) -> int | None:
    """Under `mlx.launch` with several ranks: ranks > 0 serve their layers here until rank 0
    stops (returns their rank), rank 0 returns 0 and runs the command; None without a launcher."""
    from .launch import launched

    if not launched():  # asked before MLX is imported: a plain command starts at once
        return None
    from .model.pipeline import launched_group
    from .model.weights import resolve_model
    from .rank import follow

    group = launched_group()
    if group is None:
        return None
    if expert_memory is not None:
        raise typer.BadParameter("pipeline mode keeps every routed expert in memory.",
                                 param_hint="--expert-memory")
    if group.rank() > 0:
        follow(resolve_model(model), max_context, kv_bits, prefill_chunk)
    return group.rank()


def _check_kv_bits(kv_bits: int | None) -> None:
    if kv_bits not in (None, 4, 8):
        raise typer.BadParameter("only 8, or 4 for a V4.1 model, is supported (omit the option "
                                 "for bf16 pools).", param_hint="--kv-bits")


@command()
def chat(
    model: Model,
    max_context: Context = None,
    kv_bits: KvBits = None,
    prefill_chunk: PrefillChunk = 512,
    no_think: Annotated[bool, typer.Option("--no-think", help="Answer without reasoning.")] = False,
    system: Annotated[str | None, typer.Option(metavar="TEXT", help="System prompt.")] = None,
    temperature: Annotated[float, typer.Option(min=0, metavar="FLOAT",
                                               help="0 is greedy; DeepSeek suggests 1.0.")] = 1.0,
    top_p: Annotated[float, typer.Option(min=0, max=1, metavar="FLOAT", help="Nucleus sampling mass.")] = 1.0,
    max_tokens: Annotated[int | None, typer.Option(min=1, metavar="TOKENS",
                                                   help="Longest reply; default: what the "
                                                        "context leaves, at most 8192.")] = None,
    seed: Annotated[int | None, typer.Option(metavar="N", help="Same seed, same replies.")] = None,
    draft: Draft = None,
    no_mtp: NoMtp = False,
    expert_memory: ExpertMemory = None,
    prompt_cache_bytes: CacheBytes = "1GB",
    prompt_cache_dir: CacheDir = None,
    prompt_cache_disk_bytes: CacheDiskBytes = "20GB",
    no_prompt_cache: NoCache = False,
) -> None:
    """Chat in the terminal; /help lists the commands. Under mlx.launch, one pipeline over the ranks."""
    _check_kv_bits(kv_bits)
    rank = _pipeline(model, expert_memory, max_context, kv_bits, prefill_chunk)
    if rank is not None:  # a pipeline: no MTP, no prompt cache
        if rank:
            return
        no_mtp = no_prompt_cache = True
    from rich.console import Console

    console = Console()
    # The status shows before the MLX imports: the user sees at once that something happens.
    with console.status("loading the model…"):
        from .chat import Chat
        from .repl import run

        conversation, notes = Chat.open(model, max_context=max_context, kv_bits=kv_bits,
                                        prefill_chunk=prefill_chunk, thinking=not no_think,
                                        draft=0 if no_mtp else draft, expert_memory=expert_memory,
                                        prompt_cache=_prompt_cache(prompt_cache_bytes, prompt_cache_dir,
                                                                   prompt_cache_disk_bytes, no_prompt_cache))
    conversation.system = system
    conversation.sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
                             "seed": seed}
    run(conversation, console=console, banner="\n".join(f"[dim]{n}[/dim]" for n in notes))


@command()
def serve(
    model: Model,
    host: Annotated[str, typer.Option(metavar="HOST", help="Interface to listen on; keep 127.0.0.1 unless you "
                                           "set --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, metavar="PORT", help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="DSV4_API_KEY", metavar="KEY",
                                                help="Require this bearer token.")] = None,
    max_context: Context = None,
    kv_bits: KvBits = None,
    model_id: Annotated[str | None, typer.Option(metavar="NAME", help="Model name clients see in /v1/models; "
                                                      "default: the directory name.")] = None,
    prefill_chunk: PrefillChunk = 512,
    exact_sampling: Annotated[bool, typer.Option(
        "--exact-sampling", help="Honour temperature, top_p and penalties in thinking mode too "
                                 "(by default, as DeepSeek's API: T=1, top_p>=0.95, no penalties).")] = False,
    draft: Draft = None,
    no_mtp: NoMtp = False,
    expert_memory: ExpertMemory = None,
    prompt_cache_bytes: CacheBytes = "1GB",
    prompt_cache_dir: CacheDir = None,
    prompt_cache_disk_bytes: CacheDiskBytes = "20GB",
    no_prompt_cache: NoCache = False,
    max_batch: Annotated[int | None, typer.Option(
        min=1, metavar="N", help="Requests decoding together (default: as many as fit, up to 8; "
                                 "1 serves one at a time, with MTP speculation).")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(
        "--cors-origin", metavar="ORIGIN", help="A web page allowed to use the server, e.g. "
        "http://localhost:3000 (repeatable; '*' for any page, with --api-key only). Default: none; "
        "requests from other pages are refused.")] = None,
    allow_host: Annotated[list[str] | None, typer.Option(
        "--allow-host", metavar="NAME", help="Another Host name to answer to (repeatable; '*': any). "
        "Default: localhost, 127.0.0.1 and [::1]; on a non-loopback --host also IP addresses and "
        "this machine's name.")] = None,
) -> None:
    """Serve the model: a chat page at /, OpenAI's /v1/chat/completions, /v1/completions and
    /v1/responses, Anthropic's /v1/messages. Under mlx.launch, rank 0 serves and the other ranks
    hold their share of the layers."""
    _check_kv_bits(kv_bits)
    origins = _check_origins(cors_origin or [], api_key)
    rank = _pipeline(model, expert_memory, max_context, kv_bits, prefill_chunk)
    if rank is not None:  # a pipeline: no MTP, no prompt cache
        if rank:
            return
        no_mtp = no_prompt_cache = True
        max_batch = 1  # the ranks step one sequence at a time
    from rich.console import Console

    # Said before the web stack and MLX are imported: the first line comes at once.
    Console().print(f"[dim]loading {model}…[/dim]", highlight=False)
    from .serve import serve as run
    from .model.weights import resolve_model

    run(resolve_model(model), host=host, port=port, api_key=api_key, max_context=max_context,
        model_id=model_id, kv_bits=kv_bits, prefill_chunk=prefill_chunk,
        exact_sampling=exact_sampling, draft=0 if no_mtp else draft, expert_memory=expert_memory,
        prompt_cache=_prompt_cache(prompt_cache_bytes, prompt_cache_dir, prompt_cache_disk_bytes,
                                   no_prompt_cache), max_batch=max_batch, cors_origins=origins,
        allow_hosts=allow_host or [])


def _check_origins(origins: list[str], api_key: str | None) -> list[str]:
    from .serve.guard import normal_origin  # no MLX, no web stack

    if "*" in origins and not api_key:
        raise typer.BadParameter("'*' lets every web page you visit use the server; name the pages, "
                                 "or set --api-key too.", param_hint="--cors-origin")
    try:
        return [o if o == "*" else normal_origin(o) for o in origins]
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--cors-origin") from None


@command()
def plan(
    model: Annotated[str, typer.Argument(help="Converted model directory, a config.json, or a "
                                              "release: flash, pro, deepseek-ai/DeepSeek-V4-Flash.")],
    context: Annotated[int, typer.Option("--context", "-c", metavar="TOKENS",
                                         help="Context length to plan for.")] = 1 << 20,
    recipe: Annotated[str | None, typer.Option(help="official or a conversion recipe (for a config "
                                                    "or a release; default: compare every recipe).")] = None,
    kv_bits: KvBits = None,
    prefill_chunk: PrefillChunk = 512,
    memory: Annotated[int | None, typer.Option(parser=parse_memory, metavar="SIZE",
                                               help="Plan for a machine of this size, e.g. 128GB "
                                                    "(default: this machine).")] = None,
    expert_memory: ExpertMemory = None,
    hit_rate: Annotated[float | None, typer.Option(
        min=0, max=1, metavar="FLOAT", help="Expert cache hit rate to estimate SSD reads with "
                                            "(default: the cache's share of the experts).")] = None,
    hosts: Annotated[str | None, typer.Option(metavar="SIZES", help="Split over several Macs of "
                                              "these sizes, in rank order: 512GB,512GB.")] = None,
    hostfile: Annotated[Path | None, typer.Option(metavar="FILE", help="mlx.launch's JSON hostfile, "
                                                  "each host with a \"memory\" field.")] = None,
    batch: Annotated[int, typer.Option(min=1, metavar="N", help="Sequences decoding together "
                                                                "(serve --max-batch), each at --context.")] = 1,
) -> None:
    """Will this model and context fit? Per recipe for a release; weights, KV, activations for one.

    When no recipe fits with every expert resident, plans streaming them from SSD. With --hosts
    or --hostfile: the layer split over several Macs (pipeline mode) and what each one holds."""
    _check_kv_bits(kv_bits)
    if hosts is not None or hostfile is not None:
        if batch > 1:
            raise typer.BadParameter("a pipeline over several Macs decodes one sequence at a time; "
                                     "leave out --batch with --hosts/--hostfile.", param_hint="--batch")
        return _plan_hosts(model, hosts, hostfile, context, recipe, kv_bits, prefill_chunk)
    from rich.console import Console

    from .plan import is_converted, plan_memory, plan_recipes
    from .plan_report import memory_table, recipes_table, recipes_verdict

    options = dict(context=context, kv_bits=kv_bits, prefill_chunk=prefill_chunk, memory=memory,
                   batch=batch)
    console = Console()
    if recipe is None and not is_converted(model):
        plans = plan_recipes(model, **options, expert_memory=expert_memory)
        if expert_memory is None and not any(p.fits for p in plans):
            console.print(recipes_verdict(plans) + " With the routed experts streamed from SSD:",
                          highlight=False)
            plans = plan_recipes(model, **options, expert_memory="auto")
        console.print(recipes_table(plans, kv_bits, hit_rate))
        console.print(recipes_verdict(plans, hit_rate), highlight=False)
        if not any(p.fits for p in plans):
            raise typer.Exit(2)
        return
    p = plan_memory(model, recipe=recipe, **options, expert_memory=expert_memory)
    console.print(memory_table(p, kv_bits, hit_rate))
    console.print(p.verdict(), highlight=False)
    if not p.fits:
        if not p.streams:
            console.print("--expert-memory auto plans the routed experts streamed from SSD.",
                          highlight=False)
        raise typer.Exit(2)


def _plan_hosts(model, hosts, hostfile, context, recipe, kv_bits, prefill_chunk) -> None:
    from rich.console import Console

    from .plan import parse_hosts, plan_pipeline
    from .plan_report import pipeline_table, pipeline_verdict

    p = plan_pipeline(model, parse_hosts(hosts, hostfile), context=context, recipe=recipe,
                      kv_bits=kv_bits, prefill_chunk=prefill_chunk)
    console = Console()
    console.print(pipeline_table(p))
    console.print(pipeline_verdict(p), highlight=False)
    if not p.fits:
        raise typer.Exit(2)


@command()
def bench(
    model: Model,
    prompt: Annotated[int, typer.Option(min=1, metavar="TOKENS",
                                        help="Prompt tokens to prefill (seeded random ids).")] = 2048,
    tokens: Annotated[int, typer.Option(min=2, metavar="TOKENS",
                                        help="Tokens to decode (greedy; EOS does not stop).")] = 128,
    prefill_chunk: PrefillChunk = 512,
    kv_bits: KvBits = None,
    draft: Draft = None,
    no_mtp: NoMtp = False,
    expert_memory: ExpertMemory = None,
    prompt_sizes: Annotated[str | None, typer.Option(
        metavar="TOKENS,...", help="Also time prefill alone at these prompt sizes, e.g. "
                                   "2048,8192,32768 (a fresh cache each).")] = None,
) -> None:
    """Measure prefill and decode speed and peak memory against the planner's prediction."""
    _check_kv_bits(kv_bits)
    sizes = parse_prompt_sizes(prompt_sizes)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    with console.status("starting MLX…"):
        import mlx.core as mx

        from .bench import run_bench
        from .sizes import format_bytes as mem
        from .model.weights import resolve_model

    with _PrefillBar(console) as report:
        r = run_bench(resolve_model(model), prompt_tokens=prompt, gen_tokens=tokens,
                      prefill_chunk=prefill_chunk, kv_bits=kv_bits, progress=report,
                      log=lambda line: console.print(f"[dim]{line}[/dim]", highlight=False),
                      draft=0 if no_mtp else draft, expert_memory=expert_memory,
                      prompt_sizes=sizes)

    table = Table(title=f"{r.model} on {mx.default_device()}", show_header=False)
    table.add_column()
    table.add_column(justify="right")
    table.add_row(f"prefill ({r.prompt_tokens:,} tokens, chunks of {r.prefill_chunk})",
                  f"{r.prompt_tps:,.1f} tok/s")
    table.add_row(f"decode ({r.generated:,} tokens)",
                  f"{r.decode_tps:,.2f} tok/s · {r.ms_per_token:,.1f} ms/token")
    for p in r.prefill_sizes or []:
        table.add_row(f"prefill alone ({p.tokens:,} tokens)",
                      f"{p.tps:,.1f} tok/s · peak {mem(p.peak_bytes)}")
    if r.draft:
        table.add_row(f"MTP drafts ({r.draft} per step)",
                      f"{r.acceptance:.0%} kept · {r.tokens_per_forward:.2f} tokens/forward")
    if r.experts is not None:
        c, n = r.experts, max(r.generated - 1, 1)
        table.add_row(f"expert cache ({mem(r.plan.expert_memory)})",
                      f"{c.hit_rate:.0%} hits ({c.hits + c.prefetched:,} of {c.lookups:,}, "
                      f"{c.prefetched:,} read ahead)")
        table.add_row("read from SSD per decoded token", f"{c.bytes_read / n / 1e6:,.2f} MB")
        table.add_row("read from SSD in prefill", f"{r.prefill_read / 1e6:,.2f} MB")
    table.add_row("peak memory (measured)", mem(r.peak_bytes))
    table.add_row("planned total", mem(r.plan.total_bytes))
    table.add_row("of which weights", mem(r.plan.resident_weight_bytes))
    console.print(table)


class _PrefillBar:
    """A bar over prompt tokens while bench prefills, gone once decoding starts; off a terminal,
    silent. The clock starts at the (0, total) call that opens the prefill."""

    def __init__(self, console):
        self.console, self.bar, self.t0 = console, None, 0.0

    def __enter__(self):
        return self.update if self.console.is_terminal else None

    def update(self, done: int, total: int) -> None:
        import time

        if self.bar is None:
            from rich.progress import BarColumn, Progress, TextColumn

            self.t0 = time.perf_counter()
            self.bar = Progress(TextColumn("prefill"), BarColumn(), TextColumn("{task.description}"),
                                console=self.console, transient=True)
            self.task = self.bar.add_task("", total=total)
            self.bar.start()
        self.bar.update(self.task, completed=done,
                        description=prefill_line(done, total, time.perf_counter() - self.t0))
        if done >= total:  # decoding starts: the bench's own lines follow
            self.bar.stop()

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()


def parse_prompt_sizes(text: str | None) -> list[int]:
    """"2048,8192" -> [2048, 8192]; anything else is a usage error naming the option."""
    if not text:
        return []
    try:
        sizes = [int(t) for t in text.replace(" ", "").split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"expected positive token counts separated by commas, got "
                                 f"{text!r}.", param_hint="--prompt-sizes")
    return sizes


def prefill_line(done: int, total: int, seconds: float) -> str:
    """`1,024/2,048 tokens · 512 tok/s · 2 s left`: the rate and time left once both are known."""
    line = f"{done:,}/{total:,} tokens"
    if done and seconds > 0:
        rate = done / seconds
        line += f" · {rate:,.0f} tok/s · {_duration((total - done) / rate)} left"
    return line


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@command()
def selftest(
    keep: Annotated[Path | None, typer.Option(help="Keep the tiny checkpoint and its conversion "
                                                   "in this directory.")] = None,
    model: Annotated[str, typer.Option(help="The tiny model's architecture: v4, or v41 "
                                            "(DeepSeek-V4.1: Engram, shared pools).")] = "v4",
) -> None:
    """Check the install end to end on a tiny random model: convert, load, chat, serve."""
    from .selftest import MODELS, run_selftest

    if model not in MODELS:
        raise typer.BadParameter(f"choose one of {', '.join(MODELS)}.", param_hint="--model")
    report = run_selftest(keep, log=lambda line: print(line, flush=True), model=model)
    if not report.ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
