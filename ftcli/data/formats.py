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
}
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """One training row: `messages` for chat-shaped data, `text` for completion data."""

    messages: list[dict] | None = None
    text: str | None = None

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


def to_example(row: dict, fmt: str, fields: dict[str, str], where: str, system_prompt: str | None = None) -> Example:
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
