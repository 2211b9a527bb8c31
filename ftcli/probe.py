"""The built-in retention probe: what a run cost the model's general behaviour, measured by default, without labels.

240 everyday requests of 25 kinds (explain, advise, compute, code, rewrite, list, translate, reason, write a poem,
...) written by the project itself (resources/probe_prompts.jsonl, made by scripts/make_probe_prompts.py). At the
start of a run the base model answers each one greedily (the run's chat template, no system prompt, at most 64 new
tokens); the answers are cached per base model, template and prompt set, so later runs on the same base reuse them.
The probe's number is the loss (mean NLL per token, end-of-turn included) of those answers under the base model
(before) and under the tuned model (after).

What it measures: drift, how much less likely the tuned model finds what the base model itself said on general
requests. A rise means training moved the model away from its former behaviour there; 0 means it did not move.
What it does not measure: whether answers got better or worse (there are no reference answers), knowledge on any
benchmark, or safety. A run that improves general answers drifts too. Use `eval.retention` sets with references
(MMLU-style choice, instruction data) for quality; `eval.retention: []` switches the probe off.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

PROBE = "builtin:probe"  # the value of an eval.retention entry's `data` that names the probe
NAME = "built-in probe"
PROMPTS_FILE = Path(__file__).resolve().parent / "resources" / "probe_prompts.jsonl"
MAX_NEW_TOKENS = 64
VERSION = 1  # bump when the prompts, the answering or the cache layout change


def prompts() -> list[str]:
    return [json.loads(line)["prompt"] for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines()]


def asked(limit: int | None = None) -> list[str]:
    """The prompts a probe set with this `limit` asks: the first `limit`, or all."""
    return prompts()[:limit] if limit else prompts()


def examples(model, tokenizer, *, base: str, template: str | None, limit: int | None = None, batch_size: int = 16,
             log=print) -> list:
    """The probe rows: each prompt with the base model's greedy answer as the assistant turn (cached). `model` must
    be the untrained base. With a `limit`, the whole set's cached answers serve when there are some (its first
    answers are the base model's answers to the same prompts)."""
    from ftcli import atomic
    from ftcli.data.formats import Example
    from ftcli.data.tokenize import Encoder
    from ftcli.evaluate import generate_all, stop_token_ids

    questions = asked(limit)
    encoder = Encoder(tokenizer, template, format="chat")
    answers = _lookup(encoder, base, questions)
    if answers is None:
        log(f"built-in probe: the base model answers {len(questions)} general prompts (once per base model; cached)")
        gens = generate_all(model, tokenizer, [encoder.prompt_ids([{"role": "user", "content": p}]) for p in questions],
                            max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size,
                            stop_ids=stop_token_ids(tokenizer, encoder))
        answers = [g[0].text for g in gens]
        try:
            atomic.write_json(cache_file(encoder, base, questions),
                              {"base": base, "prompts": len(questions), "answers": answers})
        except OSError:
            pass  # a read-only cache is not an error
    return [Example(messages=[{"role": "user", "content": p}, {"role": "assistant", "content": a}])
            for p, a in zip(questions, answers) if a.strip()]


def cached(tokenizer, *, base: str, template: str | None, limit: int | None = None) -> bool:
    """Whether `examples` would find the base model's answers in the cache (no generation)."""
    from ftcli.data.tokenize import Encoder

    return _lookup(Encoder(tokenizer, template, format="chat"), base, asked(limit)) is not None


def _lookup(encoder, base: str, questions: list[str]) -> list[str] | None:
    """The cached answers to `questions`: its own cache file's, else the first of the whole set's."""
    answers = _cached_answers(cache_file(encoder, base, questions), len(questions))
    if answers is None and len(questions) < len(prompts()):
        whole = _cached_answers(cache_file(encoder, base, prompts()), len(prompts()))
        answers = whole[: len(questions)] if whole is not None else None
    return answers


def cache_file(encoder, base: str, questions: list[str]) -> Path:
    """Where the base model's answers to `questions` are cached (per base model, template and prompts)."""
    from ftcli.models import cache_root, fingerprint

    key = hashlib.sha256(json.dumps({"v": VERSION, "base": fingerprint(base), "template": encoder.template,
                                     "prompts": questions, "max_new_tokens": MAX_NEW_TOKENS},
                                    sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "probe" / f"{key}.json"


def _cached_answers(path: Path, n: int) -> list[str] | None:
    """The answers in a cache file, or None where there is none, it is damaged (rebuilt) or it holds another count."""
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))["answers"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return answers if isinstance(answers, list) and len(answers) == n else None
