"""Chat template, label masking and truncation: the one home of "which tokens are trained".

Masks are derived from rendered prefixes, never from template tags: for each assistant turn i the trained span
starts where `render(messages[:i], add_generation_prompt=True)` ends and stops right after the end-of-turn token
that closes `render(messages[:i+1])`. So every assistant turn's content plus its end-of-turn token is trained, and
nothing else. Rendered text is tokenised without adding special tokens, and a BOS is prepended only if the
tokenizer normally adds one and the template did not: exactly one BOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ftcli.data.formats import Example
from ftcli.errors import UserError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}
CACHE_MIN_ROWS = 256  # smaller sets encode faster than a cache file is read
CACHE_VERSION = "2"  # bump when the encoding rules change (2: preference pairs, bad-row policy)
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # how a trained span is shown in text (check, report)


@dataclass
class Encoded:
    """Token ids and, per position, whether the loss is taken on that token (predicted from the one before)."""

    input_ids: list[int]
    trained: list[bool]
    truncated: bool = False
    aux: dict = field(default_factory=dict, repr=False, compare=False)  # what objectives precompute for it

    @property
    def n_trained(self) -> int:
        return sum(self.trained)

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def sequences(self) -> list["Encoded"]:
        return [self]

    def labels(self) -> list[int]:
        return [t if m else -100 for t, m in zip(self.input_ids, self.trained)]


@dataclass
class EncodedPair:
    """A preference row: prompt + chosen and prompt + rejected, the same prompt tokens, each completion trained."""

    chosen: Encoded
    rejected: Encoded

    @property
    def sequences(self) -> list[Encoded]:
        return [self.chosen, self.rejected]

    @property
    def length(self) -> int:
        return self.chosen.length + self.rejected.length

    @property
    def n_trained(self) -> int:
        return self.chosen.n_trained + self.rejected.n_trained

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


@dataclass
class EncodeStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_untrained: int = 0
    dropped_bad: int = 0  # preference pairs refused as bad and skipped (data.on_bad_rows: skip)
    tokens: int = 0
    trained_tokens: int = 0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["trained_fraction"] = round(self.trained_tokens / self.tokens, 4) if self.tokens else 0.0
        return d


def pad_id(tokenizer) -> int:
    """The id rows are padded with: the tokenizer's pad token, else its EOS (pads are never trained or attended)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def resolve_template(tokenizer, template: str | None) -> str:
    """The Jinja chat template: a named one, a .jinja file, inline text, or the tokenizer's own."""
    if template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("the tokenizer has no chat template; set data.chat_template (for example: chatml)")
        return tokenizer.chat_template
    if template in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[template]
    if template.endswith(".jinja"):
        path = Path(template)
        if not path.is_file():
            raise UserError(f"data.chat_template: {template}: no such file")
        return path.read_text(encoding="utf-8")
    if "{%" in template or "{{" in template:
        return template
    raise UserError(
        f"data.chat_template: {template!r} is not a known name ({', '.join(NAMED_TEMPLATES)}), a .jinja file, "
        "or a Jinja template"
    )


class Encoder:
    """Turns examples into `Encoded` rows with one tokenizer, template and length policy."""

    def __init__(self, tokenizer, template: str | None = None, max_len: int = 512, overlong: str = "truncate",
                 format: str = "chat", bad_rows=None):
        self.tokenizer = tokenizer
        self.bad_rows = bad_rows  # data.BadRows: what to do with a pair that cannot train (None: refuse it)
        self.format = format
        self.template = resolve_template(tokenizer, template) if format != "completion" else None
        self.max_len = max_len
        self.overlong = overlong
        self.eot = self._end_of_turn()
        probe = tokenizer("a").input_ids
        bos = tokenizer.bos_token_id
        self.bos_id = bos if bos is not None and probe and probe[0] == bos else None
        self.eos_id = tokenizer.eos_token_id

    def _end_of_turn(self) -> str | None:
        if self.template is None:
            return None
        if "<|im_end|>" in self.template:
            return "<|im_end|>"
        return self.tokenizer.eos_token

    # -- rendering -------------------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def trained_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of every assistant turn (content + end-of-turn)."""
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            through = self.render(messages[: i + 1])
            if not text.startswith(before) or not text.startswith(through) or len(through) < len(before):
                raise UserError(
                    "the chat template renders a conversation differently from its prefixes (it rewrites earlier "
                    "turns), so the trained span of each assistant turn cannot be derived; set data.chat_template"
                )
            end = len(through)
            if self.eot:
                cut = text.rfind(self.eot, len(before), end)
                if cut >= 0:
                    end = cut + len(self.eot)
            else:
                end = len(text[:end].rstrip())
            spans.append((len(before), end))
        return text, spans

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a generation prompt (the conversation plus the assistant header)."""
        ids = self.tokenizer(self.render(messages, add_generation_prompt=True), add_special_tokens=False).input_ids
        return self._one_bos(ids)

    # -- encoding ---------------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """What the encoding depends on besides the examples: tokenizer, template, length policy, format."""
        import hashlib

        tok = self.tokenizer
        backend = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else repr(tok.get_vocab())
        parts = [backend, str(self.template), str(self.max_len), self.overlong, self.format, str(self.bos_id),
                 str(self.eos_id), str(self.eot), CACHE_VERSION, self.bad_rows.policy if self.bad_rows else "error"]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

    def encode_all(self, examples: list[Example]) -> tuple[list[Encoded | EncodedPair | None], EncodeStats]:
        """Encode many examples (pairs for preference rows); None where a row is dropped, counted in the stats.
        Large sets are cached on disk (under the cache root's tokenized/, keyed by the examples and `fingerprint`),
        so a rerun skips this."""
        if len(examples) < CACHE_MIN_ROWS:
            return self._encode_all(examples)
        import hashlib
        import json

        from ftcli import atomic
        from ftcli.models import cache_root

        h = hashlib.sha256(self.fingerprint().encode())
        for ex in examples:
            h.update(json.dumps([ex.messages, ex.text, ex.rejected, ex.n_prompt], sort_keys=True).encode())
        path = cache_root() / "tokenized" / f"{h.hexdigest()}.json"
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
                return [_from_json(r) for r in doc["rows"]], EncodeStats(**doc["stats"])
            except (ValueError, KeyError, TypeError, IndexError):
                pass  # a damaged cache file is rebuilt
        rows, stats = self._encode_all(examples)
        doc = {"rows": [_to_json(r) for r in rows], "stats": stats.__dict__}
        try:
            atomic.write_text(path, json.dumps(doc, separators=(",", ":")))
        except OSError:
            pass  # a read-only cache is not an error
        return rows, stats

    def _encode_all(self, examples: list[Example]) -> tuple[list[Encoded | EncodedPair | None], EncodeStats]:
        stats = EncodeStats(rows=len(examples))
        if self.format == "preference":
            out = self._encode_pairs(examples, stats)
            _count(out, stats)
            return out, stats
        if self.format == "completion":
            texts = [ex.text for ex in examples]
            spans = [[(0, len(t))] for t in texts]
        else:
            rendered = [self.trained_spans(ex.messages) for ex in examples]
            texts = [r[0] for r in rendered]
            spans = [r[1] for r in rendered]
        batch = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        out: list[Encoded | None] = []
        for ids, offsets, sp in zip(batch["input_ids"], batch["offset_mapping"], spans):
            trained = [any(s <= a < e for s, e in sp) for a, _ in offsets]
            if self.format == "completion" and self.eos_id is not None:
                ids, trained = ids + [self.eos_id], trained + [True]
            if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
                ids, trained = [self.bos_id] + ids, [False] + trained
            enc = self._limit(Encoded(list(ids), trained), stats)
            out.append(enc)
        _count(out, stats)
        return out, stats

    def _encode_pairs(self, examples: list[Example], stats: EncodeStats) -> list[EncodedPair | None]:
        """prompt + chosen and prompt + rejected: the prompt rendered with the generation header and tokenised once
        (both sides share its tokens, one BOS), each completion tokenised on its own; trained: each completion's
        assistant turns and end-of-turn token, as in SFT."""
        prompts, tails, spans = [], [], []
        for ex in examples:
            prompt = self.render(ex.prompt, add_generation_prompt=True)
            prompts.append(prompt)
            for messages in (ex.messages, ex.rejected):
                text, sp = self.trained_spans(messages)
                if not text.startswith(prompt):
                    raise UserError(f"row {ex.row}: the chat template renders the prompt differently inside the "
                                    "conversation, so the completion cannot be separated; set data.chat_template")
                tails.append(text[len(prompt):])
                spans.append([(s - len(prompt), e - len(prompt)) for s, e in sp if s >= len(prompt)])
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        batch = self.tokenizer(tails, add_special_tokens=False, return_offsets_mapping=True)
        sides = [(ids, [any(s <= a < e for s, e in sp) for a, _ in offsets])
                 for ids, offsets, sp in zip(batch["input_ids"], batch["offset_mapping"], spans)]
        return [self._limit_pair(ex, self._one_bos(list(p)), sides[2 * i], sides[2 * i + 1], stats)
                for i, (ex, p) in enumerate(zip(examples, prompt_ids))]

    def _limit_pair(self, ex: Example, prompt: list[int], chosen, rejected, stats: EncodeStats) -> EncodedPair | None:
        """Both sides cut alike to max_len: the prompt loses its oldest tokens (never below half of max_len, the BOS
        kept), then both completions are cut to what is left. A side with nothing left to train is a bad row."""
        longest = max(len(chosen[0]), len(rejected[0]))
        truncated = len(prompt) + longest > self.max_len
        if truncated:
            if self.overlong == "drop":
                stats.dropped_overlong += 1
                return None
            keep = max(self.max_len // 2, self.max_len - longest)
            if len(prompt) > keep:
                head = prompt[:1] if self.bos_id is not None else []
                prompt = head + prompt[len(prompt) - (keep - len(head)):]
        room = self.max_len - len(prompt)
        (c_ids, c_tr), (r_ids, r_tr) = ((ids[:room], tr[:room]) for ids, tr in (chosen, rejected))
        problem = None
        if not any(c_tr) or not any(r_tr):
            problem = f"an empty completion after truncation to data.max_len {self.max_len}"
        elif c_ids == r_ids:
            problem = "chosen and rejected are the same tokens" + (" after truncation" if truncated else "")
        if problem:
            if self.bad_rows is None or self.bad_rows.policy == "error":
                raise UserError(f"row {ex.row}: {problem} (data.on_bad_rows: skip drops such pairs and counts them)")
            stats.dropped_bad += 1
            self.bad_rows.note(f"row {ex.row}: {problem}")
            return None
        stats.truncated += truncated
        n = len(prompt)
        return EncodedPair(Encoded(prompt + c_ids, [False] * n + c_tr, truncated),
                           Encoded(prompt + r_ids, [False] * n + r_tr, truncated))

    def encode(self, example: Example) -> Encoded | None:
        return self.encode_all([example])[0][0]

    def _limit(self, enc: Encoded, stats: EncodeStats) -> Encoded | None:
        enc.trained[0] = False  # the first token has nothing before it to be predicted from
        if len(enc.input_ids) > self.max_len:
            if self.overlong == "drop":
                stats.dropped_overlong += 1
                return None
            enc = Encoded(enc.input_ids[: self.max_len], enc.trained[: self.max_len], truncated=True)
        if not any(enc.trained):
            stats.dropped_untrained += 1
            return None
        stats.truncated += enc.truncated
        return enc

    def _one_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids


def _count(rows: list, stats: EncodeStats) -> None:
    for unit in rows:
        if unit is not None:
            stats.kept += 1
            stats.tokens += unit.length
            stats.trained_tokens += unit.n_trained


def _to_json(unit):
    if unit is None:
        return None
    return [[e.input_ids, [int(b) for b in e.trained], e.truncated] for e in unit.sequences]


def _from_json(doc):
    if doc is None:
        return None
    seqs = [Encoded(ids, [bool(b) for b in trained], bool(truncated)) for ids, trained, truncated in doc]
    return seqs[0] if len(seqs) == 1 else EncodedPair(*seqs)


def show_mask(tokenizer, enc: Encoded) -> list[tuple[str, bool]]:
    """The decoded row as (text, trained) segments: consecutive tokens with the same flag decoded together."""
    segments: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(enc.input_ids) + 1):
        if i == len(enc.input_ids) or enc.trained[i] != enc.trained[start]:
            text = tokenizer.decode(enc.input_ids[start:i], skip_special_tokens=False)
            segments.append((text, enc.trained[start]))
            start = i
    return segments


def marked_text(segments: list[tuple[str, bool]]) -> str:
    """Plain text with trained spans between ⟦ and ⟧."""
    return "".join(f"{MARK_OPEN}{t}{MARK_CLOSE}" if trained else t for t, trained in segments)
