"""Row shapes → examples: chat messages (alpaca, chat, classification, choice, preference) or raw text
(completion); the field mapping.

A recipe's `data.fields` maps the format's names to the columns of your data, e.g. `{instruction: question,
output: answer}` for alpaca, or `{messages: conversations, role: from, content: value}` for ShareGPT-style chat.

Preference rows (`prompt`, `chosen`, `rejected`) become a prompt conversation and two completions. Each field is a
string or a list of chat messages; a string prompt is one user turn as it is (`data.prompt_style: text`) or, with
`prompt_style: transcript`, a "Human: … Assistant: …" transcript (the shape of Anthropic's HH-RLHF) split into
turns. With message lists and no prompt column, the prompt is what chosen and rejected share (TRL's implicit prompt).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ftcli.errors import UserError

FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "role", "content"),
    "completion": ("text",),
    "classification": ("text", "label"),
    "choice": ("question", "choices", "answer"),
    "preference": ("prompt", "chosen", "rejected", "role", "content"),
}
# `format: auto`: the fields a row of each format has, and those it must not have (a text with a label is a
# classification row, not a completion), checked on the row's columns after the data.fields mapping
SIGNATURES = {
    "chat": (("messages",), ()),
    "alpaca": (("instruction", "output"), ()),
    "preference": (("chosen", "rejected"), ()),
    "choice": (("question", "choices", "answer"), ()),
    "classification": (("text", "label"), ()),
    "completion": (("text",), ("label",)),
}
INFER_ROWS = 100  # rows looked at to infer a format
# The user turn of a classification row: `instruction` (default below; {labels} is the label set) + the text.
DEFAULT_CLASSIFY = "Classify the text. Answer with one of: {labels}."
DEFAULT_CHOOSE = "Answer with the text of the correct option."
LETTERS = "ABCDEFGHIJ"
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """One training row: `messages` for chat-shaped data, `text` for completion data."""

    messages: list[dict] | None = None
    text: str | None = None
    choices: list[str] | None = None  # classification / choice rows: the candidate answers ...
    gold: int | None = None  # ... and the index of the right one
    rejected: list[dict] | None = None  # preference rows: the rejected conversation (messages is the chosen one)
    n_prompt: int | None = None  # preference rows: how many messages the shared prompt has
    row: int | None = None  # the row's index in its source
    place: str | None = None  # where the row is, as a person finds it ("train.jsonl line 12"; errors, the report)

    @property
    def prompt(self) -> list[dict]:
        """The conversation up to (not including) the last assistant turn (a preference row's shared prompt)."""
        if self.n_prompt is not None:
            return self.messages[: self.n_prompt]
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def answer(self) -> str:
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]


def check_fields(fmt: str, fields: dict[str, str], key: str = "data.fields") -> None:
    unknown = set(fields) - set(FIELDS[fmt])
    if unknown:
        raise UserError(
            f"{key}: {', '.join(sorted(unknown))} not a field of format {fmt!r}; its fields are {', '.join(FIELDS[fmt])}"
        )


def fits(row: dict, fields: dict[str, str]) -> list[str]:
    """The formats whose fields the row has (data.fields mapping applied)."""
    out = []
    for fmt, (need, refuse) in SIGNATURES.items():
        col = {name: fields.get(name, name) for name in FIELDS[fmt]}
        if all(row.get(col.get(n, n)) is not None for n in need) and not any(col.get(n, n) in row for n in refuse):
            out.append(fmt)
    return out


def infer_format(rows: list[dict], fields: dict[str, str], where: str) -> str:
    """`format: auto`: the one format the rows' fields fit (the first INFER_ROWS rows must agree); rows that fit
    none or more than one are an error listing their fields and what each format needs."""
    found, first = None, 0
    for i, row in enumerate(rows[:INFER_ROWS]):
        ok = fits(row, fields)
        if len(ok) != 1:
            what = "fit no format" if not ok else f"fit {' and '.join(ok)}"
            need = "; ".join(f"{f}: {', '.join(SIGNATURES[f][0])}" + (" (and no label)" if SIGNATURES[f][1] else "")
                             for f in SIGNATURES)
            raise UserError(f"{where} row {i}: format auto: its fields ({', '.join(sorted(row)) or 'none'}) {what}. "
                            f"The formats need — {need}. Set the format (and map columns with fields)")
        if found is None:
            found, first = ok[0], i
        elif ok[0] != found:
            raise UserError(f"{where}: format auto: row {first} is {found} but row {i} is {ok[0]} (fields "
                            f"{', '.join(sorted(row))}); set the format")
    if found is None:
        raise UserError(f"{where}: no rows to infer a format from")
    return found


def label_set(rows: list[dict], fields: dict[str, str]) -> list[str]:
    """The labels of a classification dataset: every distinct label value, sorted (numbers numerically)."""
    col = fields.get("label", "label")
    values = {str(r[col]) for r in rows if r.get(col) is not None}
    return sorted(values, key=lambda v: (0, float(v), v) if _is_number(v) else (1, 0.0, v))


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


# the fields that hold text (a number there is read as its text, and said); labels and answers may be numbers
TEXT_FIELDS = {"alpaca": ("instruction", "input", "output"), "completion": ("text",), "classification": ("text",),
               "choice": ("question", "choices"), "chat": ("messages",), "preference": ("prompt", "chosen", "rejected")}


def numbers_as_text(row: dict, fmt: str, fields: dict[str, str]) -> tuple[dict, list[str]]:
    """The row with every number (or true/false) in a text field turned into its text, and what was turned:
    ["output: 42", ...]. Spreadsheets and JSON exports write 42 where the answer is the text "42"."""
    def text(value):
        return str(value).lower() if isinstance(value, bool) else str(value)

    changed, out = [], dict(row)
    content = fields.get("content", "content")
    for name in TEXT_FIELDS.get(fmt, ()):
        col = fields.get(name, name)
        value = row.get(col)
        if isinstance(value, (int, float)):
            out[col] = text(value)
            changed.append(f"{col}: {value!r}")
        elif isinstance(value, list):
            items = []
            for j, item in enumerate(value):
                if isinstance(item, (int, float)):  # a list of options
                    items.append(text(item))
                    changed.append(f"{col}[{j}]: {item!r}")
                elif isinstance(item, dict) and isinstance(item.get(content), (int, float)):  # a chat message
                    items.append({**item, content: text(item[content])})
                    changed.append(f"{col}[{j}].{content}: {item[content]!r}")
                else:
                    items.append(item)
            out[col] = items
    return out, changed


def to_example(row: dict, fmt: str, fields: dict[str, str], where: str, system_prompt: str | None = None,
               instruction: str | None = None, labels: list[str] | None = None, prompt_style: str = "text") -> Example:
    """Convert one row; errors name the file, the row and the missing or bad field."""
    col = {name: fields.get(name, name) for name in FIELDS[fmt]}

    def get(name: str, required: bool = True):
        value = row.get(col[name])
        if value is None and required:
            mapped = f" (mapped from '{name}')" if col[name] != name else ""
            raise UserError(
                f"{where}: no field '{col[name]}'{mapped}; the row has {', '.join(sorted(row)) or 'no fields'}. "
                f"Map your columns with data.fields, e.g. {{{name}: your_column}}"
            )
        return value

    if fmt == "preference":
        return _preference_example(get, col, where, system_prompt, prompt_style)
    if fmt == "completion":
        text = get("text")
        if not isinstance(text, str):
            raise UserError(f"{where}: field '{col['text']}' must be a string")
        return Example(text=text)
    if fmt in ("classification", "choice"):
        ex = _choice_example(fmt, get, col, where, instruction, labels)
        if system_prompt:
            ex.messages.insert(0, {"role": "system", "content": system_prompt})
        return ex
    if fmt == "alpaca":
        instruction, output = get("instruction"), get("output")
        extra = get("input", required=False)
        user = str(instruction) if not extra else f"{instruction}\n\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": str(output)}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return Example(messages=messages)
    raw = get("messages")
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where}: field '{col['messages']}' must be a non-empty list of messages")
    messages = _messages(raw, col, where)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message, so nothing would be trained")
    return Example(messages=messages)


def _messages(raw: list, col: dict, where: str) -> list[dict]:
    """Chat messages with the recipe's role/content names, roles normalised (human → user, gpt → assistant)."""
    messages = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict) or col["role"] not in m or col["content"] not in m:
            raise UserError(f"{where}: message {j} needs '{col['role']}' and '{col['content']}'")
        role = ROLE_ALIASES.get(str(m[col["role"]]), str(m[col["role"]]))
        if role not in ROLES:
            raise UserError(f"{where}: message {j} has role {m[col['role']]!r}; expected one of {', '.join(ROLES)}")
        messages.append({"role": role, "content": "" if m[col["content"]] is None else str(m[col["content"]])})
    return messages


_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def transcript_turns(text: str) -> list[dict]:
    """A "\n\nHuman: … \n\nAssistant: …" transcript → chat turns; a final empty "Assistant:" (the prompt's
    generation header) is dropped, text before the first marker is a user turn."""
    parts = _TURN.split(text)
    turns = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []
    for who, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if who == "Human" else "assistant", "content": content.strip()})
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    return turns


def _preference_example(get, col: dict, where: str, system_prompt: str | None, prompt_style: str) -> Example:
    """prompt + chosen / prompt + rejected: strings or message lists (see the module docstring)."""
    chosen, rejected = get("chosen"), get("rejected")
    raw_prompt = get("prompt", required=not (isinstance(chosen, list) and isinstance(rejected, list)))

    def completion(value, name: str) -> list[dict]:
        if isinstance(value, list):
            return _messages(value, col, f"{where} ({name})")
        if not isinstance(value, str):
            raise UserError(f"{where}: field '{col[name]}' must be a string or a list of messages")
        return [{"role": "assistant", "content": value.strip()}]

    c, r = completion(chosen, "chosen"), completion(rejected, "rejected")
    if raw_prompt is None:  # the implicit prompt: the messages chosen and rejected share
        k = 0
        while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
            k += 1
        prompt, c, r = c[:k], c[k:], r[k:]
    elif isinstance(raw_prompt, list):
        prompt = _messages(raw_prompt, col, f"{where} (prompt)")
    elif isinstance(raw_prompt, str):
        prompt = transcript_turns(raw_prompt) if prompt_style == "transcript" else [
            {"role": "user", "content": raw_prompt}]
    else:
        raise UserError(f"{where}: field '{col['prompt']}' must be a string or a list of messages")
    if not prompt or prompt[-1]["role"] == "assistant":
        raise UserError(f"{where}: the prompt must end with a user (or system/tool) turn; got "
                        f"{'nothing' if not prompt else 'an assistant turn'}")
    for name, side in (("chosen", c), ("rejected", r)):
        if not any(m["role"] == "assistant" for m in side):
            raise UserError(f"{where}: '{col[name]}' has no assistant reply to score")
    if c == r:
        raise UserError(f"{where}: chosen and rejected are the same reply, so the pair prefers nothing")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}] + prompt
    return Example(messages=prompt + c, rejected=prompt + r, n_prompt=len(prompt))


def _choice_example(fmt: str, get, col: dict, where: str, instruction: str | None, labels: list[str] | None) -> Example:
    """A classification row (text → one of the dataset's labels) or a multiple-choice row (question, choices,
    answer as an index, a letter or the option's text); the right answer is the assistant turn."""
    if fmt == "classification":
        choices = list(labels or [])
        text, label = str(get("text")), str(get("label"))
        user = f"{(instruction or DEFAULT_CLASSIFY).format(labels=', '.join(choices))}\n\n{text}"
        gold = choices.index(label) if label in choices else None
    else:
        choices = get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise UserError(f"{where}: field '{col['choices']}' must be a list of at least 2 options")
        choices = [str(c) for c in choices]
        gold = _answer_index(get("answer"), choices, where, col["answer"])
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        user = f"{get('question')}\n\n{options}\n\n{instruction or DEFAULT_CHOOSE}"
    if gold is None:
        raise UserError(f"{where}: label {label!r} is not one of {choices}")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": choices[gold]}]
    return Example(messages=messages, choices=choices, gold=gold)


def _answer_index(answer, choices: list[str], where: str, column: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    text = str(answer).strip()
    if len(text) == 1 and text.upper() in LETTERS[: len(choices)]:
        return LETTERS.index(text.upper())
    if text in choices:
        return choices.index(text)
    raise UserError(f"{where}: field '{column}' is {answer!r}; expected an index 0..{len(choices) - 1}, a letter "
                    f"A..{LETTERS[len(choices) - 1]} or one of the options")
