"""`ftcli generate` and `ftcli chat`: sample from a base model, a run, an adapter or an exported model.

The model is loaded as `ftcli eval` loads it (scoring.load_target: an adapter folded into its base), and prompts
are rendered the way the model was trained: a run's chat template and system prompt, its end-of-turn and EOS as
stop tokens (evaluate.stop_token_ids). A model without a chat template, or a run trained on completion rows,
continues plain text instead (`--raw` asks for that on any model). Generation itself is evaluate.generate_all:
greedy by default, sampled with `--temperature` (and `--top-p`, `--top-k`), reproducible for a `--seed`.

`generate --prompt` writes the generated text alone to stdout, so it can be piped; everything else (what was
loaded, the settings) goes to stderr. `generate --file` writes one JSON line per prompt and sample. `chat` reads
turns from stdin and streams each reply to stdout as it is generated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ftcli.errors import UserError

PROMPT_FIELDS = ("prompt", "messages", "instruction")  # what a row of a prompts file may carry
CHAT_COMMANDS = "/reset starts over, /exit (or end of input) leaves"


@dataclass
class Settings:
    """What `generate`, `chat` and `synth` draw with."""

    sampling: object = None  # evaluate.Sampling; None: greedy
    max_new_tokens: int = 256
    seed: int = 0
    samples: int = 1
    batch_size: int = 8

    def __post_init__(self):
        from ftcli.evaluate import Sampling

        self.sampling = self.sampling or Sampling()
        s = self.sampling
        if s.temperature < 0:
            raise UserError(f"--temperature {s.temperature:g}: give 0 (greedy) or a positive number")
        if not 0 < s.top_p <= 1:
            raise UserError(f"--top-p {s.top_p:g}: give a number in (0, 1]")
        if s.top_k < 0:
            raise UserError(f"--top-k {s.top_k}: give 0 (no limit) or a positive number")
        if self.samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise UserError("--samples, --max-new-tokens and --batch-size must be at least 1")
        if self.samples > 1 and s.greedy:
            raise UserError(f"--samples {self.samples}: greedy decoding gives the same text every time; "
                            "sample with --temperature > 0 (e.g. 0.7)")

    def record(self) -> dict:
        s = self.sampling
        return {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "samples": self.samples}


def prompt_of(row: dict, where: str) -> list[dict] | str:
    """A row of a prompts file → the conversation to answer (messages), or text (`prompt` as a string).

    `prompt`: text (or a list of messages); `messages`: a conversation, whose last assistant turn (if it ends with
    one) is left out, so a training row asks for its own answer; `instruction` (+ `input`): an alpaca row's user
    turn, built as training builds it."""
    from ftcli.data.formats import to_example

    if "prompt" in row:
        p = row["prompt"]
        if isinstance(p, str) and p.strip():
            return p
        if isinstance(p, list) and p:
            return _messages(p, where)
        raise UserError(f"{where}: field 'prompt' must be non-empty text or a list of messages")
    if "messages" in row:
        if not isinstance(row["messages"], list) or not row["messages"]:
            raise UserError(f"{where}: field 'messages' must be a non-empty list of messages")
        msgs = _messages(row["messages"], where)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise UserError(f"{where}: 'messages' holds only assistant turns; nothing to answer")
        return msgs
    if "instruction" in row:
        return to_example({**row, "output": ""}, "alpaca", {}, where).prompt
    raise UserError(f"{where}: no prompt; the row has {', '.join(sorted(row)) or 'no fields'}. Give each row one of "
                    f"{', '.join(PROMPT_FIELDS)} (text, a list of messages, or an alpaca instruction)")


def _messages(raw: list, where: str) -> list[dict]:
    out = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {j} needs 'role' and 'content'")
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    return out


def read_prompts(path: Path) -> list[list[dict] | str]:
    from ftcli.data.sources import read_rows

    return [prompt_of(row, f"{path} row {i}") for i, row in enumerate(read_rows(str(path)))]


class Generator:
    """A loaded model and how to prompt it: template (or plain text), system prompt, stop tokens, precision."""

    def __init__(self, target, *, raw: bool = False, system: str | None = None, template: str | None = None,
                 precision: str = "fp32"):
        from ftcli.data.tokenize import Encoder
        from ftcli.evaluate import stop_token_ids
        from ftcli.runtime import autocast

        self.target, self.tokenizer = target, target.tokenizer
        asked_template = template is not None  # --chat-template overrides a completion run's plain text
        template = template or target.template
        has_template = template is not None or bool(getattr(self.tokenizer, "chat_template", None))
        self.raw = raw or (target.format == "completion" and not asked_template) or not has_template
        if self.raw and not raw:
            self.why_raw = ("the run trained on completion rows" if target.format == "completion"
                            else "the tokenizer has no chat template")
        else:
            self.why_raw = "--raw" if raw else ""
        self.encoder = Encoder(self.tokenizer, None if self.raw else template,
                               format="completion" if self.raw else "chat")
        self.stops = stop_token_ids(self.tokenizer, self.encoder)
        self.system = system if system is not None else target.system_prompt
        from ftcli.runtime import resolve_precision

        self.precision, self.precision_why = resolve_precision(precision)  # auto: bf16 where the machine has units
        self.autocast = autocast(self.precision)

    def describe(self) -> str:
        how = f"plain text ({self.why_raw})" if self.raw else "the chat template" + (
            f" with system prompt {self.system!r}" if self.system else "")
        names = [self.tokenizer.convert_ids_to_tokens(i) for i in self.stops]
        return f"prompts as {how}; stop tokens {', '.join(names)}"

    def prompt_ids(self, prompt: list[dict] | str) -> list[int]:
        if self.raw:
            if not isinstance(prompt, str):
                raise UserError("a conversation (messages) needs a chat template; this model continues plain text "
                                f"({self.why_raw}): give text prompts")
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
            bos = self.encoder.bos_id
            return [bos] + ids if bos is not None and (not ids or ids[0] != bos) else ids
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system})
        return self.encoder.prompt_ids(messages)

    def __call__(self, prompts: list, settings: Settings, *, seed: int | None = None, streamer=None) -> list:
        """Per prompt, `settings.samples` evaluate.Generation objects."""
        from ftcli.evaluate import generate_all

        return generate_all(self.target.model, self.tokenizer, [self.prompt_ids(p) for p in prompts],
                            max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                            stop_ids=self.stops, autocast=self.autocast, sampling=settings.sampling,
                            seed=settings.seed if seed is None else seed, samples=settings.samples, streamer=streamer)


def load(spec: str, *, base: str | None = None, raw: bool = False, system: str | None = None,
         template: str | None = None, precision: str = "fp32", allow_pickle: bool = False, log=print) -> Generator:
    from ftcli.runtime import resolve_precision
    from ftcli.scoring import load_target

    resolve_precision(precision)  # a bad value is refused before the model loads
    target = load_target(spec, base=base, allow_pickle=allow_pickle, log=log)
    gen = Generator(target, raw=raw, system=system, template=template, precision=precision)
    log(f"{spec} ({target.kind}): {gen.describe()}")
    return gen


# ------------------------------------------------------------------------------------------------------------
# the commands


def generate(spec: str, *, prompt: str | None, file: Path | None, settings: Settings, out: Path | None = None,
             write: Callable[[str], None], log=print, **load_kwargs) -> int:
    """`ftcli generate`: the text alone for `prompt` (samples separated by a blank line, or JSON lines with
    `out`), JSON lines for `file`; written by `write` (stdout) or into `out`. Returns the number of generations."""
    if (prompt is None) == (file is None):
        raise UserError("give --prompt TEXT or --file PROMPTS.jsonl (one of them)")
    prompts = [prompt] if prompt is not None else read_prompts(Path(file))
    gen = load(spec, log=log, **load_kwargs)
    log(f"{len(prompts)} prompt(s) × {settings.samples} sample(s) · {settings.sampling.describe()} · "
        f"at most {settings.max_new_tokens} new tokens · seed {settings.seed}")
    results = gen(prompts, settings)
    if prompt is not None and out is None:
        write("\n\n".join(g.text for g in results[0]) + "\n")
        return settings.samples
    lines = [json.dumps({"row": i, "sample": k, "prompt": p, "generation": g.text, "tokens": g.tokens,
                         "finished": g.finished}, ensure_ascii=False)
             for i, (p, gens) in enumerate(zip(prompts, results)) for k, g in enumerate(gens)]
    text = "".join(line + "\n" for line in lines)
    if out is not None:
        from ftcli import atomic

        atomic.write_text(Path(out), text)
        log(f"wrote {len(lines)} generation(s) to {out}")
    else:
        write(text)
    return len(lines)


@dataclass
class ChatState:
    messages: list[dict] = field(default_factory=list)
    turns: int = 0


def chat(spec: str, *, settings: Settings, read: Callable[[], str | None], write: Callable[[str], None],
         log=print, max_context: int | None = None, **load_kwargs) -> ChatState:
    """`ftcli chat`: read a user turn with `read` (None at the end of input), stream the reply through `write`.
    Turn t samples with seed + t, so a scripted conversation is reproducible. The oldest turns are dropped when
    the conversation no longer fits `max_context` tokens (default: the model's positions less max_new_tokens)."""
    gen = load(spec, log=log, **load_kwargs)
    if gen.raw:
        raise UserError(f"chat needs a chat template; {spec} continues plain text ({gen.why_raw}). "
                        "Use ftcli generate --prompt, or pass --chat-template chatml")
    limit = max_context or _positions(gen.target.model) - settings.max_new_tokens
    log(f"{settings.sampling.describe()} · at most {settings.max_new_tokens} new tokens · seed {settings.seed} · "
        f"{CHAT_COMMANDS}")
    state = ChatState()
    while True:
        line = read()
        if line is None or line.strip() in ("/exit", "/quit"):
            return state
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            state.messages = []
            log("(conversation reset)")
            continue
        state.messages.append({"role": "user", "content": text})
        while len(gen.prompt_ids(state.messages)) > limit and len(state.messages) > 1:
            state.messages = state.messages[2:] if len(state.messages) > 2 else state.messages[1:]
            log("(the oldest turn was dropped to fit the context)")
        streamer = _streamer(gen.tokenizer, write)
        reply = gen([state.messages], settings, seed=settings.seed + state.turns, streamer=streamer)[0][0]
        write("\n")
        state.messages.append({"role": "assistant", "content": reply.text})
        state.turns += 1


def _positions(model) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", 0) or 4096)


def _streamer(tokenizer, write):
    """A transformers streamer that hands decoded text to `write` as it arrives (the prompt skipped, special
    tokens dropped)."""
    from transformers import TextStreamer

    class Stream(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                write(text)

    return Stream(tokenizer, skip_prompt=True, skip_special_tokens=True)
