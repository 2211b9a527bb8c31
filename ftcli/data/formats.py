"""Row shapes → examples: chat messages (alpaca, chat) or raw text (completion); the field mapping.

A recipe's `data.fields` maps the format's names to the columns of your data, e.g. `{instruction: question,
output: answer}` for alpaca, or `{messages: conversations, role: from, content: value}` for ShareGPT-style chat.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftcli.errors import UserError

FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "role", "content"),
    "completion": ("text",),
    "classification": ("text", "label"),
    "choice": ("question", "choices", "answer"),
}
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

    @property
    def prompt(self) -> list[dict]:
        """The conversation up to (not including) the last assistant turn."""
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


def to_example(row: dict, fmt: str, fields: dict[str, str], where: str, system_prompt: str | None = None,
               instruction: str | None = None, labels: list[str] | None = None) -> Example:
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
    messages = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict) or col["role"] not in m or col["content"] not in m:
            raise UserError(f"{where}: message {j} needs '{col['role']}' and '{col['content']}'")
        role = ROLE_ALIASES.get(str(m[col["role"]]), str(m[col["role"]]))
        if role not in ROLES:
            raise UserError(f"{where}: message {j} has role {m[col['role']]!r}; expected one of {', '.join(ROLES)}")
        messages.append({"role": role, "content": "" if m[col["content"]] is None else str(m[col["content"]])})
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message, so nothing would be trained")
    return Example(messages=messages)


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
