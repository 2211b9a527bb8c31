"""The run folder: resolved recipe, metrics.jsonl, report.json, report.md and loss.png (DESIGN.md, The run folder)."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from ftcli import atomic
from ftcli.vocab import ordered

METRICS_FILE = "metrics.jsonl"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("ftcli", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["git_commit"] = git_commit()
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


class MetricsLog:
    """metrics.jsonl: one JSON object per line, written with one write call and flushed per line; each record also
    goes to the run's trackers (ftcli/trackers.py), so they hold the same numbers."""

    def __init__(self, run_dir: Path, trackers: list | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.trackers = trackers or []

    def append(self, record: dict) -> None:
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise atomic.WriteFailed(self.path, atomic.write_failure(self.path, e)) from e
        for t in self.trackers:
            t.log(record)

    def sync(self) -> None:
        """fsync the log (before a checkpoint: the lines up to it survive a power loss with it)."""
        if self.path.is_file():
            atomic.fsync_path(self.path)

    def close(self, status: str) -> None:
        for t in self.trackers:
            t.close(status)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: dropped on resume
                pass
        return out

    def truncate_after(self, step: int) -> None:
        """On resume: drop what was logged after the checkpoint, so the log reads as one uninterrupted run."""
        keep = [r for r in self.read() if r.get("step", 0) <= step]
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        for t in self.trackers:
            t.truncate_after(step)


# ------------------------------------------------------------------------------------------------------------
# plots and the report


def plot_losses(records: list[dict], path: Path, title: str) -> bool:
    """loss.png: training loss per step (and its moving average) with validation loss points."""
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    if not train and not val:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, color="#9ecae1", linewidth=1, label="train loss (per step)")
        if len(ys) >= 10:
            k = max(3, len(ys) // 20)
            smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, color="#08519c", linewidth=2, label=f"train loss ({k}-step mean)")
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "o--", color="#d94801", linewidth=1.2, markersize=6, label="validation loss (at evaluations)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    try:
        with atomic.file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return True


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _delta(before, after) -> str:
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        return f"{after - before:+.4g}"
    return "–"


def metrics_table(before: dict, after: dict, keys: list[str]) -> list[str]:
    lines = ["| metric | before | after | change |", "| --- | ---: | ---: | ---: |"]
    for k in keys:
        if k in before or k in after:
            lines.append(f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} | {_delta(before.get(k), after.get(k))} |")
    return lines


def render_markdown(s: dict) -> str:
    """report.md from the same summary dict as report.json."""
    run, thr, params = s["run"], s["throughput"], s["parameters"]
    out = [f"# ftcli run: {run['name']}", ""]
    out += [
        f"**{run['status']}** after {run['steps']} of {run['total_steps']} steps · strategy `{run['strategy']}` · "
        f"objective `{run.get('objective', 'sft')}` on "
        f"`{run['base_model']}` · precision {run.get('precision', 'fp32')} · wall time {run['wall_s']:.0f} s"
        + (f" · resumed from step {run['resumed_from']}" if run.get("resumed_from") else "")
        + (f" · {run['processes']} processes ({run['distributed']}), global batch {run['global_batch']}"
           if (run.get("processes") or 1) > 1 else ""),
        "",
    ]
    if s.get("message"):
        out += [f"> {s['message']}", ""]
    before, after = s.get("before", {}), s.get("after", {})
    if before or after:
        out += ["## Validation: before and after training", ""]
        keys = [k for k in ordered({**before, **after}) if isinstance((after or before).get(k), float)
                and k != "rows_per_s"]
        out += metrics_table(before, after, keys)
        if s.get("best"):
            out += ["", f"Best validation loss {s['best']['loss']:.4f} at step {s['best']['step']}."]
        out += [""]
    if s.get("retention"):
        out += ["## Forgetting (retention sets, base model before vs tuned model after)", "",
                "| set | metric | before | after | change |", "| --- | --- | ---: | ---: | ---: |"]
        for r in s["retention"]:
            out.append(f"| {r['name']} | {r['metric']} | {_fmt(r.get('before'))} | {_fmt(r.get('after'))} | "
                       f"{_delta(r.get('before'), r.get('after'))} |")
        if any(r.get("data") == "builtin:probe" for r in s["retention"]):
            out += ["", "The built-in probe is the loss of the base model's own greedy answers to general prompts "
                    "written by ftcli: a rise means the tuned model moved away from what the base model said there "
                    "(drift); it does not say whether answers got better or worse (no reference answers)."]
        out += [""]
    if Path(s.get("plot") or "").name:
        out += ["## Loss", "", f"![loss curves]({s['plot']})", ""]
    out += ["## Throughput and memory", "", "| | |", "| --- | ---: |"]
    out += [
        f"| tokens/s (non-pad, training) | {_fmt(thr.get('tokens_per_s'))} |",
        f"| trained tokens/s | {_fmt(thr.get('trained_tokens_per_s'))} |",
        f"| seconds per step | {_fmt(thr.get('s_per_step'))} |",
        f"| padding (of computed positions) | {thr.get('padding_fraction', 0) * 100:.1f}% |",
        f"| peak RSS | {_fmt(thr.get('peak_rss_mb'))} MB |",
    ]
    if len(thr.get("peak_rss_mb_per_process") or []) > 1:
        out.append(f"| peak RSS per process | {' / '.join(_fmt(m) for m in thr['peak_rss_mb_per_process'])} MB |")
    if thr.get("peak_gpu_mb"):
        out.append(f"| peak GPU memory | {_fmt(thr['peak_gpu_mb'])} MB |")
    out += [
        f"| trainable parameters | {params['trainable']:,} of {params['total']:,} ({params['fraction'] * 100:.3f}%) |",
        "",
    ]
    out += ["## Data", ""]
    if s["data"].get("format"):
        inferred = s["data"].get("inferred") or {}
        shown = "per dataset, below" if s.get("mixture") else s["data"]["format"]
        out += [f"Format: {shown}" + (" (" + "; ".join(f"{k}: auto → {v}" for k, v in inferred.items()) + ")"
                                      if inferred else ""), ""]
    out += _mixture_table(s.get("mixture"))
    out += ["| split | rows | kept | tokens | trained tokens | trained fraction | truncated | dropped |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, st in s["data"]["splits"].items():
        dropped = st["dropped_overlong"] + st["dropped_untrained"] + st.get("dropped_bad", 0)
        out.append(f"| {name} | {st['rows']:,} | {st['kept']:,} | {st['tokens']:,} | {st['trained_tokens']:,} | "
                   f"{st['trained_fraction'] * 100:.1f}% | {st['truncated']:,} | {dropped:,} |")
    bad = s["data"].get("bad_rows") or {}
    if bad.get("skipped"):
        more = ", …" if bad["skipped"] > len(bad.get("at", [])) else ""
        out += ["", f"**{bad['skipped']:,} bad rows skipped** (data.on_bad_rows: skip), at "
                    f"{', '.join(bad.get('at', []))}{more}. The first: {bad['first'][0] if bad.get('first') else '?'}"]
    ex = s["data"].get("example")
    if ex:
        out += ["", "One training example, the trained span between ⟦ and ⟧:", "", "```text", ex, "```"]
    if s.get("samples"):
        out += ["", "## Sample generations (after)", ""]
        for smp in s["samples"]:
            out += [f"- **prompt**: {smp['prompt'][:200]!s}", f"  - reference: `{smp['reference'][:200]}`",
                    f"  - generated: `{smp['prediction'][:200]}`"]
    if s.get("strategy_details"):
        details = {k: v for k, v in s["strategy_details"].items() if k != "rounds_selected"}
        out += ["", "## Strategy details", "", "```json", json.dumps(details, indent=1), "```"]
        out += _rounds_table(s["strategy_details"].get("rounds_selected") or [])
    if s.get("objective_details"):
        out += ["", "## Objective details", "", "```json", json.dumps(s["objective_details"], indent=1), "```"]
    out += ["", "## Recipe (resolved)", "", "```yaml", s["recipe_yaml"].rstrip(), "```", ""]
    return "\n".join(out)


def _mixture_table(mix: dict | None) -> list[str]:
    """A mixture: per dataset, what was asked and what the run drew, its rows and tokens, its validation loss."""
    if not mix:
        return []
    out = [f"Mixture ({mix['mode']}): examples drawn from each dataset during training against the share asked.", "",
           "| dataset | format | asked | drawn | rows | tokens | trained tokens | validation loss (before → after) |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, d in mix["datasets"].items():
        how = f"weight {d['weight']:g}" if d.get("weight") is not None else f"repeat {d['repeat']:g}"
        loss = (f"{_fmt(d.get('validation_loss_before'))} → {_fmt(d.get('validation_loss_after'))}"
                if "validation_rows" in d else "–")
        out.append(f"| {name} | {d['format']} | {d['asked_share'] * 100:.1f}% ({how}) | {d['drawn']:,} "
                   f"({d['drawn_share'] * 100:.1f}%) | {d['rows']:,} | {d['tokens']:,} | {d['trained_tokens']:,} | "
                   f"{loss} |")
    return out + [""]


def _rounds_table(rounds: list[dict]) -> list[str]:
    """HFT: the modules frozen in every block in every round (folded away: rounds × blocks rows)."""
    if not rounds:
        return []
    blocks = len(rounds[0]["frozen"])
    out = ["", f"<details><summary>Frozen modules per round and block ({len(rounds)} rounds × {blocks} blocks; "
               "the same as hft_rounds.jsonl)</summary>", "", "| round | from step | block | frozen |",
           "| ---: | ---: | ---: | --- |"]
    for r in rounds:
        for b, names in r["frozen"].items():
            out.append(f"| {r['round']} | {r['from_step']} | {b} | {', '.join(names)} |")
    return out + ["", "</details>"]


def write_report(run_dir: Path, summary: dict, records: list[dict]) -> None:
    run_dir = Path(run_dir)
    summary = dict(summary)
    if plot_losses(records, run_dir / "loss.png", f"{summary['run']['name']} ({summary['run']['strategy']})"):
        summary["plot"] = "loss.png"
    atomic.write_json(run_dir / "report.json", summary)
    atomic.write_text(run_dir / "report.md", render_markdown(summary))
