"""`ftcli synth`: write a training set from a teacher model: prompts in, filtered samples out, and a record of how.

The teacher is anything `ftcli generate` loads (an alias, a model folder, a run, an adapter with --base). Prompts
come from a rows file (each row: `prompt`, `messages` or an alpaca `instruction` + `input`, as for generate), or
from a YAML file of templates whose `{slots}` are filled from lists:

    templates: ["Write a {mood} review of a {thing}."]
    slots: {mood: [glowing, scathing], thing: [film, novel, restaurant]}
    count: 4          # optional: that many combinations drawn with the seed; default: every combination

Each prompt is sampled `samples` times. A sample is kept when it passes, in this order: finished (ended with a stop
token, with --drop-unfinished), length (--min-chars / --max-chars), --regex (must match) and --exclude-regex (must
not), the judge (the teacher asked `--judge`, a question about the prompt and output, scored by log-likelihood:
log p("yes") − log p("no") above --judge-threshold), then exact duplicates and near duplicates (Jaccard similarity
of character 5-grams at least --near-dup against a kept row) of the whole row. Kept rows are written as JSON lines
in a training format (alpaca, chat or completion) and OUT.synth.json records the teacher, the settings, the seed
and how many rows each filter dropped.

Prompts are taken in chunks of --batch-size; chunk c samples with a seed derived from (seed, c), so a chunk's rows
do not depend on which chunks ran before in this process. After each chunk its rows are appended to OUT (flushed to
disk) and then the record is replaced with the new byte length of OUT. A killed synth, run again with the same
command, cuts OUT back to the recorded length (so a chunk written but not recorded is not kept twice), rebuilds the
duplicate index from the kept rows and continues with the next chunk: the result is the same file an uninterrupted
run writes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import string
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ftcli.errors import RunError, UserError

FORMATS = ("auto", "alpaca", "chat", "completion")
FILTERS = ("unfinished", "too_short", "too_long", "regex", "exclude_regex", "judge", "duplicate", "near_duplicate")
JUDGE_ANSWERS = ("yes", "no")
RECORD_VERSION = 1


def record_path(out: Path) -> Path:
    return out.with_name(out.name + ".synth.json")


# ------------------------------------------------------------------------------------------------------------
# prompts


@dataclass
class Prompt:
    value: list[dict] | str  # messages, or text
    row: dict  # the row it came from (an alpaca row keeps its instruction and input in the output)

    @property
    def text(self) -> str:
        """The prompt as one text: the last user turn of a conversation."""
        if isinstance(self.value, str):
            return self.value
        return [m["content"] for m in self.value if m["role"] == "user"][-1]


def read_prompts(path: Path, seed: int) -> tuple[list[Prompt], dict]:
    """The prompts of a rows file or a templates file, and what the record says about where they came from."""
    from ftcli.generate import prompt_of

    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file")
    source = {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if path.suffix.lower() in (".yaml", ".yml"):
        texts, info = fill_templates(path, seed)
        return [Prompt(t, {"prompt": t}) for t in texts], {**source, **info}
    from ftcli.data.sources import read_rows

    rows = read_rows(str(path))
    return [Prompt(prompt_of(r, f"{path} row {i}"), r) for i, r in enumerate(rows)], {**source, "rows": len(rows)}


def fill_templates(path: Path, seed: int) -> tuple[list[str], dict]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--prompts {path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict) or set(doc) - {"templates", "slots", "count"} or "templates" not in doc:
        raise UserError(f"--prompts {path}: expected keys templates (a list of texts with {{slots}}), slots (name: "
                        "list of values) and optionally count")
    templates = [doc["templates"]] if isinstance(doc["templates"], str) else doc["templates"]
    slots = doc.get("slots") or {}
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates) or not templates:
        raise UserError(f"--prompts {path}: templates must be a list of texts")
    if not isinstance(slots, dict) or not all(isinstance(v, list) and v for v in slots.values()):
        raise UserError(f"--prompts {path}: slots must map each name to a non-empty list of values")
    combos = []
    for t, template in enumerate(templates):
        try:
            names = sorted({f for _, f, _, _ in string.Formatter().parse(template) if f is not None})
        except ValueError as e:
            raise UserError(f"--prompts {path}: template {t}: {e}") from None
        missing = [n for n in names if n not in slots]
        if missing:
            raise UserError(f"--prompts {path}: template {t} uses {{{missing[0]}}}, which is not under slots "
                            f"(slots: {', '.join(slots) or 'none'})")
        for values in itertools.product(*(slots[n] for n in names)):
            combos.append(template.format_map(dict(zip(names, map(str, values)))))
    count = doc.get("count")
    if count is not None:
        if not isinstance(count, int) or not 1 <= count <= len(combos):
            raise UserError(f"--prompts {path}: count {count!r}: give a number from 1 to {len(combos)} "
                            "(the combinations of the templates' slots)")
        combos = [combos[i] for i in sorted(random.Random(f"synth/templates/{seed}").sample(range(len(combos)),
                                                                                          count))]
    return combos, {"templates": len(templates), "combinations": len(combos)}


# ------------------------------------------------------------------------------------------------------------
# rows


def choose_format(fmt: str, prompts: list[Prompt], raw: bool) -> str:
    if fmt != "auto":
        return fmt
    if raw:
        return "completion"
    return "chat" if any(isinstance(p.value, list) and _turns(p.value) > 1 for p in prompts) else "alpaca"


def _turns(messages: list[dict]) -> int:
    return sum(m["role"] != "system" for m in messages)


def to_row(fmt: str, prompt: Prompt, generation) -> dict:
    """One training row of format `fmt` from a prompt and the teacher's generation."""
    if fmt == "completion":
        if not isinstance(prompt.value, str):
            raise UserError("--format completion needs text prompts (the row is the prompt followed by its "
                            "continuation); these prompts are conversations: use --format chat")
        return {"text": prompt.value + generation.raw}
    if fmt == "chat":
        messages = [{"role": "user", "content": prompt.value}] if isinstance(prompt.value, str) else prompt.value
        return {"messages": [*messages, {"role": "assistant", "content": generation.text}]}
    if isinstance(prompt.value, list) and _turns(prompt.value) > 1:
        raise UserError("--format alpaca holds one instruction and one answer; these prompts are conversations of "
                        "several turns: use --format chat")
    if "instruction" in prompt.row:
        row = {"instruction": prompt.row["instruction"]}
        if prompt.row.get("input"):
            row["input"] = prompt.row["input"]
        return {**row, "output": generation.text}
    return {"instruction": prompt.text, "output": generation.text}


def row_text(row) -> str:
    """Every string in a row, in order: what duplicates are judged on."""
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        return "\n".join(row_text(v) for v in row.values())
    if isinstance(row, list):
        return "\n".join(row_text(v) for v in row)
    return str(row)


# ------------------------------------------------------------------------------------------------------------
# filters


@dataclass
class Filters:
    min_chars: int = 1
    max_chars: int | None = None
    regex: str | None = None
    exclude_regex: str | None = None
    drop_unfinished: bool = False
    dedup: bool = True
    near_dup: float = 0.9  # Jaccard similarity of character 5-grams; 0 switches it off
    judge: str | None = None  # a question with {prompt} and {output}, answered yes or no by the teacher
    judge_threshold: float = 0.0  # keep when log p(yes) − log p(no) is above it

    def __post_init__(self):
        for flag, pattern in (("--regex", self.regex), ("--exclude-regex", self.exclude_regex)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise UserError(f"{flag} {pattern!r}: not a regular expression ({e})") from None
        if not 0 <= self.near_dup <= 1:
            raise UserError(f"--near-dup {self.near_dup:g}: a Jaccard similarity between 0 (off) and 1")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise UserError(f"--max-chars {self.max_chars} is below --min-chars {self.min_chars}")
        if self.judge is not None:
            try:
                self.judge.format(prompt="", output="")
            except (KeyError, IndexError, ValueError) as e:
                raise UserError(f"--judge: the question may use {{prompt}} and {{output}} only ({e})") from None

    def first_failure(self, generation) -> str | None:
        """The first cheap filter a generation fails (before the judge and the duplicate checks), or None."""
        text = generation.text
        if self.drop_unfinished and not generation.finished:
            return "unfinished"
        if len(text) < self.min_chars:
            return "too_short"
        if self.max_chars is not None and len(text) > self.max_chars:
            return "too_long"
        if self.regex is not None and not re.search(self.regex, text):
            return "regex"
        if self.exclude_regex is not None and re.search(self.exclude_regex, text):
            return "exclude_regex"
        return None


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


class NearDuplicates:
    """Rows whose character 5-gram sets have a Jaccard similarity of at least `threshold` with a row added before.

    MinHash locality-sensitive hashing (Broder 1997): 64 hash functions in 16 bands of 4, so two rows of similarity
    s share a band with probability 1 − (1 − s⁴)¹⁶ (0.99999996 at s = 0.9); rows that share a band are then
    compared exactly. Written out (with numpy) rather than taken from datasketch, which pulls in scipy for this
    one filter. Deterministic: the hash functions are fixed, the shingles hashed with CRC-32."""

    PERMS, BANDS, PRIME = 64, 16, (1 << 61) - 1

    def __init__(self, threshold: float):
        import numpy as np

        self.threshold = threshold
        rng = np.random.default_rng(20240601)
        self.a = rng.integers(1, 1 << 32, self.PERMS, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 32, self.PERMS, dtype=np.uint64)
        self.buckets: list[dict] = [{} for _ in range(self.BANDS)]
        self.sets: list[set[int]] = []

    @staticmethod
    def shingles(text: str) -> set[int]:
        t = _normal(text)
        grams = {t[i : i + 5] for i in range(max(1, len(t) - 4))}
        return {zlib.crc32(g.encode()) for g in grams}

    def _bands(self, sh: set[int]) -> list[bytes]:
        import numpy as np

        x = np.fromiter(sh, dtype=np.uint64, count=len(sh))
        sig = ((np.outer(self.a, x) + self.b[:, None]) % np.uint64(self.PRIME)).min(axis=1)
        rows = self.PERMS // self.BANDS
        return [sig[i * rows : (i + 1) * rows].tobytes() for i in range(self.BANDS)]

    def is_near(self, text: str) -> bool:
        sh = self.shingles(text)
        seen: set[int] = set()
        for band, key in enumerate(self._bands(sh)):
            for j in self.buckets[band].get(key, ()):
                if j not in seen:
                    seen.add(j)
                    other = self.sets[j]
                    if len(sh & other) / len(sh | other) >= self.threshold:
                        return True
        return False

    def add(self, text: str) -> None:
        sh = self.shingles(text)
        j = len(self.sets)
        self.sets.append(sh)
        for band, key in enumerate(self._bands(sh)):
            self.buckets[band].setdefault(key, []).append(j)


class Kept:
    """The duplicate indexes over the rows kept so far."""

    def __init__(self, filters: Filters):
        self.filters = filters
        self.exact: set[str] = set()
        self.near = NearDuplicates(filters.near_dup) if filters.near_dup > 0 else None

    def problem(self, row: dict) -> str | None:
        text = row_text(row)
        if self.filters.dedup and hashlib.sha1(_normal(text).encode()).hexdigest() in self.exact:
            return "duplicate"
        if self.near is not None and self.near.is_near(text):
            return "near_duplicate"
        return None

    def add(self, row: dict) -> None:
        text = row_text(row)
        self.exact.add(hashlib.sha1(_normal(text).encode()).hexdigest())
        if self.near is not None:
            self.near.add(text)


def judge_scores(gen, prompts: list[Prompt], generations: list, question: str, batch_size: int) -> list[float]:
    """log p("yes") − log p("no") of the teacher answering `question` about each (prompt, generation)."""
    from ftcli.data.formats import Example
    from ftcli.data.tokenize import Encoder
    from ftcli.evaluate import choice_scores
    from ftcli.scoring import EVAL_MAX_LEN

    if gen.raw:
        raise UserError(f"--judge needs a teacher with a chat template ({gen.why_raw})")
    encoder = Encoder(gen.tokenizer, gen.encoder.template, EVAL_MAX_LEN, "truncate", "chat")
    examples = []
    for p, g in zip(prompts, generations):
        messages = [{"role": "user", "content": question.format(prompt=p.text, output=g.text)},
                    {"role": "assistant", "content": JUDGE_ANSWERS[0]}]
        examples.append(Example(messages=messages, choices=list(JUDGE_ANSWERS), gold=0))
    scores = choice_scores(gen.target.model, encoder, examples, batch_size=batch_size, autocast=gen.autocast)
    return [s[0] - s[1] for s in scores]


# ------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class Record:
    """OUT.synth.json: how the rows were made, and how far a run got."""

    teacher: str
    teacher_files: dict  # models.fingerprint of the teacher: its files' names, sizes and times
    settings: dict
    filters: dict
    prompts: dict
    format: str
    prompting: dict  # plain text or the chat template, the system prompt
    key: str  # a hash of everything above that decides the rows: a resume must match it
    counts: dict = field(default_factory=lambda: {"prompts": 0, "generated": 0, "kept": 0,
                                                  "dropped": {f: 0 for f in FILTERS}})
    chunks_done: int = 0
    bytes: int = 0
    complete: bool = False
    seconds: float = 0.0
    version: int = RECORD_VERSION


def _key(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def chunk_seed(seed: int, chunk: int) -> int:
    return random.Random(f"synth/{seed}/{chunk}").getrandbits(62)


def synth(teacher: str, *, prompts: Path, out: Path, settings, filters: Filters, fmt: str = "auto",
          limit: int | None = None, overwrite: bool = False, console=None, log=print, **load_kwargs) -> Record:
    """Write OUT (JSON lines) and OUT.synth.json; continue an interrupted run of the same command."""
    from ftcli import atomic
    from ftcli.generate import load
    from ftcli.models import fingerprint

    out = Path(out)
    if out.suffix.lower() != ".jsonl":
        raise UserError(f"--out {out}: write to a .jsonl file")
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    items, source = read_prompts(Path(prompts), settings.seed)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit {limit}: give at least 1")
        items, source = items[:limit], {**source, "limit": limit}
    try:
        teacher_id = fingerprint(teacher)
    except (UserError, OSError):
        teacher_id = {"spec": teacher}
    record_file = record_path(out)
    if overwrite:
        out.unlink(missing_ok=True)
        record_file.unlink(missing_ok=True)
    existing = _read_record(record_file)
    if out.exists() and existing is None:
        raise UserError(f"--out {out} exists and has no {record_file.name} beside it (not a synth output); "
                        "pass --overwrite to replace it")
    if existing is not None and existing.bytes and not out.exists():
        raise UserError(f"{record_file} records {existing.bytes} bytes of rows but {out} is gone; pass --overwrite "
                        "to start again")

    gen = load(teacher, log=log, **load_kwargs)
    fmt = choose_format(fmt, items, gen.raw)
    decided = {"teacher_files": teacher_id, "settings": settings.record() | {"batch_size": settings.batch_size},
               "filters": asdict(filters), "prompts": source, "format": fmt,
               "prompting": {"raw": gen.raw, "system": gen.system, "template": gen.encoder.template}}
    key = _key(decided)
    if existing is not None and existing.key != key:
        changed = [k for k in decided if json.dumps(getattr(existing, k), sort_keys=True, default=str) !=
                   json.dumps(decided[k], sort_keys=True, default=str)]
        raise UserError(f"--out {out} was written by a synth with different {', '.join(changed)}; run the same "
                        "command to continue it, or pass --overwrite to start again")
    rec = existing or Record(teacher, key=key, **decided)
    rec.counts["prompts"] = len(items)
    if rec.complete:
        log(f"{out} is complete ({rec.counts['kept']} rows); nothing to do (--overwrite starts again)")
        return rec
    kept = Kept(filters)
    if existing is not None:
        _cut(out, rec.bytes)
        for line in out.read_text(encoding="utf-8").splitlines() if out.exists() else []:
            kept.add(json.loads(line))
        log(f"resuming {out}: {rec.chunks_done} chunk(s) done, {rec.counts['kept']} rows kept")
    B = settings.batch_size
    chunks = (len(items) + B - 1) // B
    log(f"{len(items)} prompts × {settings.samples} samples in {chunks} chunks of {B} · "
        f"{settings.sampling.describe()} · seed {settings.seed} · writing {fmt} rows to {out}")
    bar, task = _progress(console, chunks, rec.chunks_done, rec.counts["kept"])
    t0 = time.perf_counter() - rec.seconds
    try:
        with bar or nullcontext():
            for c in range(rec.chunks_done, chunks):
                part = items[c * B : (c + 1) * B]
                gens = gen([p.value for p in part], settings, seed=chunk_seed(settings.seed, c))
                lines = _filter_chunk(gen, part, gens, fmt, filters, kept, rec.counts, settings.batch_size)
                with out.open("ab") as f:
                    f.write("".join(line + "\n" for line in lines).encode("utf-8"))
                    f.flush()
                    os.fsync(f.fileno())
                    rec.bytes = f.tell()
                rec.chunks_done = c + 1
                rec.seconds = time.perf_counter() - t0
                atomic.write_json(record_file, asdict(rec))
                if bar:
                    bar.update(task, completed=c + 1, kept=rec.counts["kept"])
                elif chunks >= 10 and (c + 1) % max(1, chunks // 10) == 0:
                    log(f"chunk {c + 1}/{chunks} · {rec.counts['kept']} rows kept")
    except KeyboardInterrupt:
        raise RunError(f"interrupted after {rec.chunks_done} of {chunks} chunks ({rec.counts['kept']} rows kept); "
                       "run the same command again to continue") from None
    if not out.exists():
        out.touch()
    rec.complete = True
    rec.seconds = time.perf_counter() - t0
    atomic.write_json(record_file, asdict(rec))
    dropped = ", ".join(f"{k} {v}" for k, v in rec.counts["dropped"].items() if v) or "none"
    log(f"kept {rec.counts['kept']} of {rec.counts['generated']} generations (dropped: {dropped}) · {out} · "
        f"record: {record_file}")
    return rec


def _filter_chunk(gen, part: list[Prompt], gens: list, fmt: str, filters: Filters, kept: Kept, counts: dict,
                  batch_size: int) -> list[str]:
    dropped = counts["dropped"]
    pending = []  # (prompt, generation) that passed the cheap filters
    for p, samples in zip(part, gens):
        for g in samples:
            counts["generated"] += 1
            why = filters.first_failure(g)
            if why:
                dropped[why] += 1
            else:
                pending.append((p, g))
    if filters.judge and pending:
        scores = judge_scores(gen, [p for p, _ in pending], [g for _, g in pending], filters.judge, batch_size)
        passing = []
        for item, s in zip(pending, scores):
            if s > filters.judge_threshold:
                passing.append(item)
            else:
                dropped["judge"] += 1
        pending = passing
    lines = []
    for p, g in pending:
        row = to_row(fmt, p, g)
        why = kept.problem(row)
        if why:
            dropped[why] += 1
            continue
        kept.add(row)
        counts["kept"] += 1
        lines.append(json.dumps(row, ensure_ascii=False))
    return lines


def _read_record(path: Path) -> Record | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("version") != RECORD_VERSION:
            return None
        return Record(**doc)
    except (ValueError, TypeError):
        raise UserError(f"{path}: not a synth record (damaged?); pass --overwrite to start again") from None


def _cut(out: Path, size: int) -> None:
    """Cut OUT back to the length the record vouches for (rows written after the last record are dropped)."""
    if out.exists() and out.stat().st_size > size:
        with out.open("r+b") as f:
            f.truncate(size)


def _progress(console, total: int, done: int, kept: int):
    if console is None or not console.is_terminal:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]synth chunks"), MofNCompleteColumn(), BarColumn(),
                   TextColumn("{task.fields[kept]} kept"), TimeElapsedColumn(), TextColumn("left"),
                   TimeRemainingColumn(), console=console)
    return bar, bar.add_task("synth", total=total, completed=done, kept=kept)
