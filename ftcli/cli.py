"""The `ftcli` command line: parses arguments, calls one function per command, prints with rich. No logic here.

Heavy imports (torch, transformers) happen inside the commands, so `ftcli --help` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from ftcli.vocab import METRICS, SFT_FORMATS, ordered

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune language models from YAML recipes. Exit codes: 0 ok, 2 bad input, 1 a failed run.",
)
_state = {"debug": False}


def _console():
    from rich.console import Console

    # soft_wrap: paths and numbers stay on one line whatever the terminal width (scripts grep them)
    return Console(stderr=False, highlight=False, soft_wrap=True)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show full tracebacks")):
    _state["debug"] = debug


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="the recipe YAML file"),
    set_: List[str] = typer.Option([], "--set", help="override a recipe key: dotted.key=value (repeatable)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="run folder (default: the recipe's output)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run folder from its last checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow .bin/.pt weights (they can run code)"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="processes on this machine: runs the command under torchrun "
                              "(gloo on CPUs, NCCL on GPUs); training.batch_size is per process"),
):
    """Train a recipe: validate, build, train, validate on held-out rows, write the run folder."""
    from ftcli import distributed
    from ftcli import recipe as recipe_mod
    from ftcli import train as train_mod
    from ftcli.runtime import tune_process

    r = recipe_mod.load(recipe, set_)  # a bad recipe is said once, before any process starts
    if nproc > 1 and not distributed.launched():
        raise typer.Exit(distributed.relaunch(nproc, distributed.strip_nproc(sys.argv[1:])))
    tune_process()  # process-wide settings (malloc, oneDNN kernel caches): the command's to make, not the library's
    console = _console()
    run_dir = train_mod.run(r, output=output or recipe_mod.default_output(r), resume=resume, overwrite=overwrite,
                            allow_pickle=allow_pickle, console=console)
    if distributed.world().main:
        _print_run_summary(console, run_dir)
    distributed.close()


@app.command()
def check(
    recipe: Path = typer.Argument(..., help="the recipe YAML file"),
    set_: List[str] = typer.Option([], "--set", help="override a recipe key: dotted.key=value (repeatable)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="plan for this many processes (train --nproc N): the global "
                              "batch, the steps and, with training.distributed fsdp, the memory per process"),
    probe: int = typer.Option(0, "--probe", min=0, metavar="K", help="also train K real steps in a temporary folder "
                              "(a whole run cut short) and project the run's time and peak memory from them"),
):
    """Validate and resolve a recipe without training: data statistics, a decoded example, parameter counts,
    memory; with --probe K, K timed steps and a projection of the run."""
    from ftcli import plan
    from ftcli import recipe as recipe_mod
    from ftcli.errors import UserError

    r = recipe_mod.load(recipe, set_)
    if probe and nproc > 1:
        raise UserError("--probe times a run in one process; drop --nproc to probe (the plan for several processes "
                        "needs no probe)")
    console = _console()
    p = plan.build(r, allow_pickle=allow_pickle, log=console.print, processes=nproc)
    _print_plan(console, r, p)
    if probe:
        _print_probe(console, r, p, probe, allow_pickle)


def _print_probe(console, r, p, k: int, allow_pickle: bool) -> None:
    from ftcli import forecast
    from ftcli.runtime import tune_process

    tune_process()  # as `train` runs: the probe's steps and memory are the run's
    console.rule(f"probe: {k} real step{'s' if k > 1 else ''}")
    with console.status(f"training {k} step(s) in a temporary folder"):
        f = forecast.probe(r, p.steps, k, allow_pickle=allow_pickle)
    estimate = p.memory["total"]
    console.print(f"{f.probe_steps} step(s) in a {forecast.minutes(f.probe_wall_s)} run: median {f.step_s:.2f} s per "
                  f"step, {f.tokens_per_s:.0f} tokens/s")
    console.print(f"peak RSS {f.peak_rss_mb:,.0f} MB measured; the estimate above says {estimate:,.0f} MB "
                  f"({(estimate - f.peak_rss_mb) / f.peak_rss_mb:+.0%})")
    kinds = sorted({x.kind for x in f.sampled})
    parts = [f"the probe's {forecast.minutes(f.probe_wall_s)} (loading, the validation loss before and after, "
             + (f"{', '.join(kinds)} on up to {forecast.SAMPLE} rows, " if kinds else "") + "saving)"]
    if f.steps > f.probe_steps:
        parts.append(f"{f.steps - f.probe_steps} more steps × {f.step_s:.2f} s")
    if f.passes_between:
        parts.append(f"{f.passes_between} validation pass(es) between steps × {f.loss_pass_s:.1f} s")
    parts += [f"{x.what} ≈ {forecast.minutes(x.run_s)} (the probe's {x.sample_rows} rows took {x.seconds:.1f} s)"
              for x in f.sampled if x.run_rows > x.sample_rows]
    console.print(f"[bold]projected run: {f.steps} steps ≈ {forecast.minutes(f.projected_s)}[/] = "
                  + " + ".join(parts))
    if f.not_timed:
        console.print("not timed by the probe (add them): " + "; ".join(f.not_timed))


def _print_plan(console, r, p) -> None:
    from rich.syntax import Syntax
    from rich.table import Table
    from rich.text import Text

    console.rule("resolved recipe")
    console.print(Syntax(r.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))
    table = Table(title="data", title_justify="left")
    for col in ("split", "rows", "kept", "tokens", "trained tokens", "trained %", "truncated", "dropped"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for name, st in p.splits.items():
        table.add_row(name, f"{st['rows']:,}", f"{st['kept']:,}", f"{st['tokens']:,}", f"{st['trained_tokens']:,}",
                      f"{st['trained_fraction'] * 100:.1f}", f"{st['truncated']:,}",
                      f"{st['dropped_overlong'] + st['dropped_untrained'] + st['dropped_bad']:,}")
    console.print(table)
    console.print(f"parameters: {p.trainable:,} trainable of {p.total:,} ({p.trainable / max(p.total, 1) * 100:.3f}%)"
                  f" · strategy {r.strategy.name} · objective {r.objective.name} · {p.steps} optimiser steps")
    console.print(f"precision: {r.training.precision} ({r.precision_why})")
    t = r.training
    console.print(f"global batch: {r.global_batch(p.processes)} rows per step = batch_size {t.batch_size} × grad_accum "
                  f"{t.grad_accum} × {p.processes} process{'es' if p.processes > 1 else ''}"
                  + (f" ({t.distributed})" if p.processes > 1 else ""))
    if p.groups:
        groups = Table(title="what trains, by group", title_justify="left")
        for col in ("group", "weights trained or adapted", "trainable parameters"):
            groups.add_column(col, justify="left" if col == "group" else "right")
        for name, g in p.groups.items():
            groups.add_row(name, f"{g['weights']:,}", f"{g['trainable']:,}")
        console.print(groups)
    mem = Table(title="training memory per process, estimated (MB)", title_justify="left")
    mem.add_column("part")
    mem.add_column("MB", justify="right")
    for part, mb in p.memory.items():
        mem.add_row(part, f"{mb:,.0f}")
    console.print(mem)
    console.print(f"run folder: {p.output}")
    for line in p.notes:
        console.print(f"[yellow]note:[/] {line}")
    what = "one preference pair" if len(p.example) == 2 else "one training example"
    console.rule(f"{what} (trained span highlighted and between ⟦ ⟧)")
    for title, segments in p.example:
        if title:
            console.print(f"[bold]{title}:[/]")
        text = Text()
        for seg, trained in segments:
            text.append(f"⟦{seg}⟧" if trained else seg, style="bold green" if trained else "dim")
        console.print(text)


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="a built-in alias, a model folder, a run folder, or an adapter (with --base)"),
    data: Path = typer.Option(..., "--data", "-d", help=".jsonl/.json/.csv/.parquet rows to score"),
    format: str = typer.Option("auto", "--format", "-f", help="auto (from the rows' fields) | " + " | ".join(SFT_FORMATS)),
    metrics: Optional[str] = typer.Option(None, "--metrics", "-m",
                                          help=f"comma-separated: {', '.join(METRICS)} (default: by format)"),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="score only N rows (the first N)"),
    sample: Optional[int] = typer.Option(None, "--sample", help="with --limit: a random sample drawn with this seed"),
    compare: Optional[str] = typer.Option(None, "--compare", help="a second model (OTHER) scored on the same rows; change = MODEL − OTHER"),
    base: Optional[str] = typer.Option(None, "--base", help="the base model of an adapter"),
    field: List[str] = typer.Option([], "--field", help="map a format field to your column: name=column (repeatable)"),
    instruction: Optional[str] = typer.Option(None, "--instruction", help="classification/choice instruction"),
    template: Optional[str] = typer.Option(None, "--chat-template", help="'chatml', a .jinja file or inline"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 where the machine has bf16 units) | fp32 | bf16"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the numbers to this JSON file"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
):
    """Score a model, a run or an adapter on a dataset; --compare puts a second model beside it."""
    from ftcli import scoring
    from ftcli.errors import UserError
    from ftcli.runtime import tune_process

    tune_process()
    fields = {}
    for item in field:
        if "=" not in item:
            raise UserError(f"--field {item!r}: expected name=column")
        k, v = item.split("=", 1)
        fields[k.strip()] = v.strip()
    if format not in ("auto", *SFT_FORMATS):
        raise UserError(f"--format {format!r}: choose from auto, {', '.join(SFT_FORMATS)}")
    if json_out is not None and json_out.is_dir():
        raise UserError(f"--json {json_out}: a folder; give the name of the JSON file to write")
    es = scoring.EvalSet(data=str(data), format=format, fields=fields, limit=limit, sample_seed=sample,
                         metrics=[m.strip() for m in metrics.split(",") if m.strip()] if metrics else [],
                         instruction=instruction)
    console = _console()
    result = scoring.run_eval([model] + ([compare] if compare else []), es, base=base, template=template,
                              batch_size=batch_size, max_new_tokens=max_new_tokens, precision=precision,
                              allow_pickle=allow_pickle, log=lambda m: console.print(f"[dim]{m}[/]"))
    _print_eval(console, result)
    if json_out:
        from ftcli import atomic

        atomic.write_json(json_out, result)
        console.print(f"wrote {json_out}")


def _print_eval(console, result: dict) -> None:
    from rich.table import Table

    specs = list(result["models"])
    names = [_short(s) for s in specs]
    table = Table(title=f"{_short(result['data'])} · {result['rows']} rows · format {result['format']}")
    table.add_column("metric", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    if len(specs) == 2:
        table.add_column("change", justify="right", no_wrap=True)
    for m in result["metrics"] + ["rows_per_s"]:
        vals = [result["models"][s].get(m) for s in specs]
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in vals]
        if len(specs) == 2:
            cells.append(f"{vals[0] - vals[1]:+.4f}" if None not in vals else "")  # MODEL − OTHER
        table.add_row(m, *cells)
    console.print(table)
    for name, spec in zip(names, specs):
        if name != spec:
            console.print(f"[dim]{name} = {spec}[/]")


def _short(spec: str) -> str:
    """A column-sized name for a model or file: its last two path parts."""
    parts = Path(spec).parts
    return spec if len(parts) <= 2 else "/".join(parts[-2:])


def _print_run_summary(console, run_dir: Path) -> None:
    import json

    s = json.loads((run_dir / "report.json").read_text())
    b, a = s.get("before", {}), s.get("after", {})
    console.print(f"[bold]run folder:[/] {run_dir}")
    for key in ordered(a):
        if isinstance(b.get(key), float) and isinstance(a.get(key), float) and key != "rows_per_s":
            console.print(f"validation {key}: {b[key]:.4f} → {a[key]:.4f}")
    for row in s.get("retention") or []:
        if row.get("before") is not None and row.get("after") is not None:
            console.print(f"retention {row['name']} {row['metric']}: {row['before']:.4f} → {row['after']:.4f}")
    thr = s["throughput"]
    if s["run"].get("precision"):
        console.print(f"precision {s['run']['precision']} ({s['run'].get('precision_why')})")
    console.print(f"{thr['tokens_per_s']:.0f} tokens/s · {s['run']['wall_s']:.0f} s · peak RSS "
                  f"{thr['peak_rss_mb']:.0f} MB · report: {run_dir / 'report.md'}")


def _floats(text: Optional[str], flag: str) -> Optional[list[float]]:
    if text is None:
        return None
    from ftcli.errors import UserError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated numbers, e.g. {flag} 1,-0.5") from None


@app.command()
def merge(
    adapters: List[Path] = typer.Argument(..., help="adapter folders, run folders or adapter_model.safetensors files"),
    method: str = typer.Option(..., "--method", "-m", help="cat | linear | svd | ties | dare_linear | dare_ties"),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="one weight per adapter: 1,-1 (default all 1)"),
    rank: Optional[int] = typer.Option(None, "--rank", "-r",
                                       help="output rank for svd/ties/dare (default: the largest input rank), "
                                            "optional for linear"),
    density: Optional[float] = typer.Option(None, "--density", help="ties/dare: fraction of ΔW entries kept"),
    seed: int = typer.Option(0, "--seed", help="dare: seed of the drop masks"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="the new adapter folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out folder"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print what would be merged; write nothing"),
):
    """Combine LoRA adapters from their files alone (no base model) into a new PEFT adapter folder."""
    from ftcli import merge as merge_mod
    from ftcli.runtime import tune_process

    tune_process()  # the heap keeps freed batches for the next shape group (docs/merge.md)
    console = _console()
    res = merge_mod.merge_adapters(adapters, method, _floats(weights, "--weights"), rank, density, seed, out,
                                   dry_run=dry_run, overwrite=overwrite)
    _print_merge(console, res)


def _print_merge(console, res) -> None:
    from rich.table import Table

    head = (f"{res.method} of {len(res.inputs)} adapters, weights {','.join(f'{w:g}' for w in res.weights)}"
            f" → rank {res.rank} (lora_alpha {res.rank}, scale 1)")
    if res.density is not None:
        head += f", density {res.density:g}, seed {res.seed}"
    if res.dry_run:
        table = Table(title=f"would merge ({head})", title_justify="left")
        for col in ("module", "ΔW shape", "input ranks", "rank", "exact"):
            table.add_column(col, justify="left" if col == "module" else "right")
        for m in res.modules:
            table.add_row(m.name.removeprefix("base_model.model."), f"{m.shape[0]}×{m.shape[1]}",
                          "+".join(map(str, m.in_ranks)), str(m.rank),
                          "yes" if m.error == 0.0 else "truncated" if m.error is None else f"{m.error:.2e}")
        console.print(table)
        for path in res.inputs:
            console.print(f"input: {path}")
        return
    worst = max(res.modules, key=lambda m: m.error or 0.0)
    console.print(head)
    console.print(f"{len(res.modules)} modules · truncation error (relative Frobenius) max {res.max_error:.3e}"
                  + (f" at {worst.name.removeprefix('base_model.model.')}" if res.max_error > 0 else " (exact)"))
    console.print(f"[bold]adapter folder:[/] {res.out}")


@app.command()
def export(
    run: Optional[Path] = typer.Argument(None, help="a finished run folder"),
    out: Path = typer.Option(..., "--out", "-o", help="the model folder to write"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="an adapter folder or file instead of a run"),
    base: Optional[str] = typer.Option(None, "--base", help="with --adapter: the base model (alias, folder, hub id)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out folder"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow .bin/.pt weights (they can run code)"),
):
    """Fold a run's adapter (or --adapter into --base) and write a standard transformers folder, checked by logits."""
    from ftcli import export as export_mod

    console = _console()
    res = export_mod.export(run=run, out=out, adapter=adapter, base=base, overwrite=overwrite,
                            allow_pickle=allow_pickle, log=console.print)
    console.print(f"logits of the export vs base+adapter on {res.prompts} prompts: max |diff| {res.max_diff:.2e} "
                  f"(tolerance {res.tolerance:.0e})")
    console.print(f"stop tokens in generation_config.json: {res.stop_ids}")
    console.print(f"[bold]model folder:[/] {res.out}")


@app.command()
def prune(
    model: str = typer.Argument(..., help="a built-in alias, a model folder, or a run folder"),
    method: str = typer.Option(..., "--method", "-m", help="magnitude | wanda"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", "-s", help="fraction of each layer's weights "
                                             "zeroed, 0 < S < 1 (implied by --pattern)"),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M: keep N of every M consecutive weights, e.g. 2:4"),
    out: Path = typer.Option(..., "--out", "-o", help="the pruned model folder to write"),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="rows for perplexity before/after (and, after "
                                        "them, wanda's calibration rows)"),
    format: str = typer.Option("alpaca", "--format", "-f", help=" | ".join(SFT_FORMATS)),
    eval_rows: int = typer.Option(100, "--eval-rows", help="rows of --data scored before and after"),
    calibration_rows: int = typer.Option(32, "--calibration-rows", help="wanda: rows after the scored ones"),
    max_len: int = typer.Option(512, "--max-len", help="wanda: tokens per calibration row"),
    template: Optional[str] = typer.Option(None, "--chat-template", help="'chatml', a .jinja file or inline"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out folder"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
):
    """Zero a fraction of every block linear weight (magnitude or Wanda, unstructured or N:M); perplexity before and
    after; write a transformers folder. Train it further with training.keep_zeros to keep the zeros."""
    from ftcli import prune as prune_mod
    from ftcli.errors import UserError

    if format not in SFT_FORMATS:
        raise UserError(f"--format {format!r}: choose from {', '.join(SFT_FORMATS)}")
    console = _console()
    res = prune_mod.prune(model, method=method, sparsity=sparsity, pattern=pattern, out=out, data=data, fmt=format,
                          eval_rows=eval_rows, calibration_rows=calibration_rows, max_len=max_len, template=template,
                          overwrite=overwrite, allow_pickle=allow_pickle, log=lambda m: console.print(f"[dim]{m}[/]"))
    console.print(f"{res.method}{' ' + res.pattern if res.pattern else ''}: {res.pruned:,} of {res.total:,} weights "
                  f"in {res.layers} block linear layers zeroed ({res.pruned / max(res.total, 1):.4f}; asked "
                  f"{res.sparsity:g}, worst layer off by {res.worst_layer_error:.2e})")
    if res.before and res.after:
        console.print(f"perplexity on {res.before['rows']} rows: {res.before['perplexity']:.3f} → "
                      f"{res.after['perplexity']:.3f}")
    console.print(f"[bold]model folder:[/] {res.out}")


def _settings(temperature, top_p, top_k, max_new_tokens, seed, samples, batch_size):
    from ftcli.evaluate import Sampling
    from ftcli.generate import Settings

    return Settings(Sampling(temperature, top_p, top_k), max_new_tokens, seed, samples, batch_size)


def _log_err():
    """A log function for commands whose stdout is data: dim lines on stderr, markup characters kept as text."""
    from rich.markup import escape

    err = _console_err()
    return lambda m: err.print(f"[dim]{escape(m)}[/]")


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


_MODEL_HELP = "a built-in alias, a model folder (merged or exported), a run folder, or an adapter (with --base)"
_TEMPERATURE = typer.Option(0.0, "--temperature", "-t", help="0: greedy; above 0: sample at this temperature")
_TOP_P = typer.Option(1.0, "--top-p", help="sample from the smallest set of tokens with this much probability")
_TOP_K = typer.Option(0, "--top-k", help="sample from at most this many tokens (0: no limit)")
_SEED = typer.Option(0, "--seed", help="the sampling seed: the same seed gives the same text")
_SYSTEM = typer.Option(None, "--system", help="a system message (default: the run's)")
_GEN_PRECISION = typer.Option("fp32", "--precision", help="fp32 (the default: the same text on every machine) | bf16 | "
                              "auto (bf16 where the machine has bf16 matrix units)")


@app.command()
def generate(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="one prompt; the text alone goes to stdout"),
    file: Optional[Path] = typer.Option(None, "--file", "-f",
                                        help="prompts, one row each: prompt | messages | instruction (+input)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write JSON lines here instead of stdout"),
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n"),
    seed: int = _SEED,
    samples: int = typer.Option(1, "--samples", "-k", help="generations per prompt (needs --temperature > 0)"),
    batch_size: int = typer.Option(8, "--batch-size", help="prompts per batch (left-padded)"),
    base: Optional[str] = typer.Option(None, "--base", help="the base model of an adapter"),
    system: Optional[str] = _SYSTEM,
    raw: bool = typer.Option(False, "--raw", help="continue the prompt as plain text, no chat template"),
    template: Optional[str] = typer.Option(None, "--chat-template", help="'chatml', a .jinja file or inline"),
    precision: str = _GEN_PRECISION,
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
):
    """Generate from a model or a run: --prompt TEXT (text to stdout, messages to stderr) or --file (JSON lines)."""
    from ftcli import generate as gen_mod

    gen_mod.generate(model, prompt=prompt, file=file, out=out,
                     settings=_settings(temperature, top_p, top_k, max_new_tokens, seed, samples, batch_size),
                     write=_write_stdout, log=_log_err(), base=base, raw=raw,
                     system=system, template=template, precision=precision, allow_pickle=allow_pickle)


@app.command()
def chat(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n"),
    seed: int = _SEED,
    base: Optional[str] = typer.Option(None, "--base", help="the base model of an adapter"),
    system: Optional[str] = _SYSTEM,
    template: Optional[str] = typer.Option(None, "--chat-template", help="'chatml', a .jinja file or inline"),
    precision: str = _GEN_PRECISION,
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
):
    """Talk to a model or a run: turns from stdin, replies streamed to stdout (/reset, /exit)."""
    from ftcli import generate as gen_mod

    err = _console_err()
    interactive = sys.stdin.isatty()

    def read():
        if interactive:
            err.print("[bold]you>[/] ", end="")
        line = sys.stdin.readline()
        return line if line else None

    gen_mod.chat(model, settings=_settings(temperature, top_p, top_k, max_new_tokens, seed, 1, 1), read=read,
                 write=_write_stdout, log=_log_err(), base=base, system=system,
                 template=template, precision=precision, allow_pickle=allow_pickle)


@app.command()
def synth(
    teacher: str = typer.Argument(..., help=_MODEL_HELP),
    prompts: Path = typer.Option(..., "--prompts", help="prompt rows (.jsonl/.json/.csv/.parquet) or a YAML file of "
                                 "templates with {slots}"),
    out: Path = typer.Option(..., "--out", "-o", help="the .jsonl file to write (OUT.synth.json records how)"),
    format: str = typer.Option("auto", "--format", help="auto | alpaca | chat | completion"),
    limit: Optional[int] = typer.Option(None, "--limit", help="use only the first N prompts"),
    samples: int = typer.Option(1, "--samples", "-k", help="samples per prompt"),
    seed: int = _SEED,
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0: greedy; above 0: sample"),
    top_p: float = typer.Option(0.95, "--top-p"),
    top_k: int = _TOP_K,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n"),
    batch_size: int = typer.Option(8, "--batch-size", help="prompts per chunk (one generation batch)"),
    min_chars: int = typer.Option(1, "--min-chars", help="drop generations shorter than this"),
    max_chars: Optional[int] = typer.Option(None, "--max-chars", help="drop generations longer than this"),
    regex: Optional[str] = typer.Option(None, "--regex", help="keep only generations this pattern finds"),
    exclude_regex: Optional[str] = typer.Option(None, "--exclude-regex", help="drop generations it finds"),
    drop_unfinished: bool = typer.Option(False, "--drop-unfinished", help="drop generations cut at max-new-tokens"),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="drop exact duplicate rows"),
    near_dup: float = typer.Option(0.9, "--near-dup", help="drop rows this similar to a kept row (Jaccard of "
                                   "character 5-grams); 0: off"),
    judge: Optional[str] = typer.Option(None, "--judge", help="a yes/no question with {prompt} and {output}, "
                                        "answered by the teacher; keep when log p(yes) − log p(no) > threshold"),
    judge_threshold: float = typer.Option(0.0, "--judge-threshold"),
    base: Optional[str] = typer.Option(None, "--base", help="the base model of an adapter teacher"),
    system: Optional[str] = _SYSTEM,
    raw: bool = typer.Option(False, "--raw", help="continue prompts as plain text, no chat template"),
    template: Optional[str] = typer.Option(None, "--chat-template", help="'chatml', a .jinja file or inline"),
    precision: str = _GEN_PRECISION,
    overwrite: bool = typer.Option(False, "--overwrite", help="start again instead of continuing --out"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
):
    """Write training rows from a teacher: sampled, filtered, resumable (run the same command again to continue)."""
    from ftcli import synth as synth_mod

    settings = _settings(temperature, top_p, top_k, max_new_tokens, seed, samples, batch_size)
    filters = synth_mod.Filters(min_chars, max_chars, regex, exclude_regex, drop_unfinished, dedup, near_dup, judge,
                                judge_threshold)
    synth_mod.synth(teacher, prompts=prompts, out=out, settings=settings, filters=filters, fmt=format, limit=limit,
                    overwrite=overwrite, console=_console_err(), log=_log_err(), base=base, raw=raw, system=system,
                    template=template, precision=precision, allow_pickle=allow_pickle)


def main() -> None:
    """Entry point: run the app; known errors print one message and exit 2 (bad input) or 1 (failed run)."""
    from ftcli.errors import FtcliError
    from ftcli.logs import quiet

    from ftcli import distributed

    quiet()
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(code) comes back as its return value
        if isinstance(code, int) and code:
            sys.exit(code)
    except FtcliError as e:
        if _state["debug"]:
            raise
        from rich.markup import escape

        # several processes fail together: the first to fail says why, once
        if distributed.first_failure():
            # soft_wrap: a path or key in the message is never broken across lines
            _console_err().print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as e:  # usage errors (typer's own copy of click's): a message, exit 2
        if _state["debug"]:
            raise
        e.show()
        sys.exit(2)
    except Exception:
        if distributed.launched() and not _state["debug"] and not distributed.first_failure():
            sys.exit(1)  # another process failed first (and said why); this one lost its peers
        raise


def _console_err():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


if __name__ == "__main__":  # pragma: no cover
    main()
