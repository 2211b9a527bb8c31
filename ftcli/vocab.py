"""One vocabulary of data formats and metrics, and the one rule of which metric a format allows.

The recipe (data, eval, retention sets), `ftcli eval`, validation during training and the report all read these
names from here, so `ftcli check` refuses exactly what `train` or `eval` would.
"""

from __future__ import annotations

from typing import Literal

from ftcli.errors import UserError

FORMATS = ("alpaca", "chat", "completion", "classification", "choice", "preference")
Format = Literal["alpaca", "chat", "completion", "classification", "choice", "preference"]
SFT_FORMATS = ("alpaca", "chat", "completion", "classification", "choice")  # one target sequence per row
AUTO = "auto"  # a format inferred from the rows' fields (data.formats.infer_format)

# every metric, in the order tables show them, with what it needs of a row
METRICS = {
    "loss": "the objective's loss per trained token (per pair for preference rows)",
    "perplexity": "exp(loss) of next-token prediction",
    "exact_match": "a prompt and a reference answer (generation)",
    "rougeL": "a prompt and a reference answer (generation)",
    "numeric": "a prompt and a reference answer (generation)",
    "accuracy": "candidate answers (classification or choice rows)",
    "choice": "candidate answers (classification or choice rows)",
    "macro_f1": "labels (classification rows): the mean over labels of each label's F1",
}
Metric = Literal["loss", "perplexity", "exact_match", "rougeL", "numeric", "accuracy", "choice", "macro_f1"]
GENERATION = ("exact_match", "rougeL", "numeric")
CANDIDATES = ("accuracy", "choice", "macro_f1")  # from the predicted candidate (or, with a head, the predicted label)

ALLOWED = {  # format → the metrics it can be scored with
    "alpaca": ("loss", "perplexity", *GENERATION),
    "chat": ("loss", "perplexity", *GENERATION),
    "completion": ("loss", "perplexity"),
    "classification": ("loss", "perplexity", *GENERATION, *CANDIDATES),
    "choice": ("loss", "perplexity", *GENERATION, "accuracy", "choice"),
    "preference": ("loss",),
}
DEFAULT_METRICS = {"classification": ["accuracy"], "choice": ["choice"], "completion": ["loss", "perplexity"],
                   "alpaca": ["loss", "perplexity"], "chat": ["loss", "perplexity"], "preference": ["loss"]}

WHY = {
    "completion": "format completion has no prompt and no reference answer (use alpaca or chat)",
    "preference": "preference rows are scored by the objective's own loss and metrics (reward accuracy, margin)",
}


def metric_problem(fmt: str, metric: str) -> str | None:
    """Why `metric` cannot score rows of format `fmt`, or None when it can."""
    if metric not in METRICS:
        return f"unknown metric {metric}; choose from {', '.join(METRICS)}"
    if metric in ALLOWED[fmt]:
        return None
    if metric == "macro_f1":
        return f"metric macro_f1 averages over labels, so it needs format classification (text, label); the format is {fmt}"
    if metric in CANDIDATES:
        return (f"metric {metric} scores candidate answers, so it needs format classification (text, label) or "
                f"choice (question, choices, answer); the format is {fmt}")
    return f"metric {metric} does not apply to format {fmt}: {WHY.get(fmt, METRICS[metric])}"


def check_metrics(fmt: str, metrics: list[str], where: str) -> None:
    """UserError naming `where` for the first metric the format cannot be scored with."""
    for m in metrics:
        problem = metric_problem(fmt, m)
        if problem:
            raise UserError(f"{where}: {problem}")


def ordered(keys) -> list[str]:
    """Metric names in table order; names outside the vocabulary (an objective's own) after them, as given."""
    keys = list(keys)
    return [m for m in METRICS if m in keys] + [k for k in keys if k not in METRICS]
