"""Valid but unusual data files load with every row, verbatim; unreadable ones are one clear error.

The oddities are the ones real files have: U+0085 / U+2028 / U+2029 inside JSON strings (MMLU's test.jsonl has a
U+0085 on line 10752, and str.splitlines() splits there), Windows line endings, a UTF-8 byte-order mark, blank
lines at the end, non-Latin text and emoji, .json list files, CSV with quoted commas and line breaks."""

from __future__ import annotations

import csv
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftcli.data.sources import read_rows
from ftcli.errors import UserError

ROWS = [
    {"instruction": "split\u0085here", "output": "NEL inside a string"},  # as MMLU test.jsonl line 10752
    {"instruction": "line\u2028separator and\u2029paragraph separator", "output": "ok"},
    {"instruction": "Ünïcödé, 中文, русский, العربية, हिन्दी", "output": "emoji 🙂👍🏽 and a ZWJ 👩‍💻"},
    {"instruction": 'quotes " and , commas, and a\nreal newline', "output": "tab\there"},
    {"instruction": "007", "output": "1974-02-09"},  # stays text: no type inference
]


def jsonl(rows, *, eol="\n", bom=False, tail="", ensure_ascii=False) -> bytes:
    text = eol.join(json.dumps(r, ensure_ascii=ensure_ascii) for r in rows) + eol + tail
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")


@pytest.mark.parametrize("eol", ["\n", "\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("bom", [False, True], ids=["", "BOM"])
@pytest.mark.parametrize("tail", ["", "\n\n", "\n \n\t\n"], ids=["", "blank-lines", "whitespace-lines"])
def test_jsonl_oddities_load_every_row_verbatim(tmp_path, eol, bom, tail):
    f = tmp_path / "rows.jsonl"
    f.write_bytes(jsonl(ROWS, eol=eol, bom=bom, tail=tail.replace("\n", eol)))
    assert read_rows(str(f)) == ROWS


def test_json_list_and_json_lines_in_a_json_file(tmp_path):
    a = tmp_path / "list.json"
    a.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS, ensure_ascii=False, indent=2).replace("\n", "\r\n").encode())
    assert read_rows(str(a)) == ROWS
    b = tmp_path / "lines.json"
    b.write_bytes(jsonl(ROWS))
    assert read_rows(str(b)) == ROWS


@pytest.mark.parametrize("eol", ["\n", "\r\n"], ids=["LF", "CRLF"])
def test_csv_with_quoted_commas_newlines_and_separators(tmp_path, eol):
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["instruction", "output"], lineterminator=eol)
    w.writeheader()
    w.writerows(ROWS)
    f = tmp_path / "rows.csv"
    f.write_bytes(b"\xef\xbb\xbf" + buf.getvalue().encode("utf-8") + eol.encode())
    assert read_rows(str(f)) == ROWS


def test_the_row_mmlu_line_10752_holds(tmp_path):
    """A reconstruction of that line's shape: a U+0085 inside a question, rows before and after."""
    rows = [{"id": i, "question": "q" + ("\u0085x" if i == 1 else ""), "choices": ["a", "b"], "answer": 0}
            for i in range(3)]
    f = tmp_path / "test.jsonl"
    f.write_bytes(jsonl(rows))
    assert len(f.read_text(encoding="utf-8").splitlines()) == 4  # what splitlines() made of it
    assert read_rows(str(f)) == rows


@given(st.lists(st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=30), min_size=1, max_size=4),
                min_size=1, max_size=6),
       st.sampled_from(["\n", "\r\n"]), st.booleans(), st.booleans(), st.sampled_from(["", "\n", "\n\n  \n"]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_jsonl_text_round_trips(tmp_path, rows, eol, bom, ascii_only, tail):
    """Whatever the strings hold (every Unicode line break, control characters, surrogate-free text), a JSONL file
    written one object per line reads back as the same rows."""
    f = tmp_path / "p.jsonl"
    f.write_bytes(jsonl(rows, eol=eol, bom=bom, tail=tail.replace("\n", eol), ensure_ascii=ascii_only))
    assert read_rows(str(f)) == rows


# ------------------------------------------------------------------------------------------------------------
# files that cannot be read: one message naming the file, the line and what is allowed


def error(tmp_path, name: str, data: bytes | None) -> str:
    f = tmp_path / name
    if data is None:
        f.mkdir()
    else:
        f.write_bytes(data)
    with pytest.raises(UserError) as e:
        read_rows(str(f))
    return str(e.value)


def test_binary_file(tmp_path):
    msg = error(tmp_path, "img.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    assert "img.jsonl line 1: a binary file (byte 0x89 at offset 0 is not UTF-8); save it as UTF-8" in msg


def test_latin1_file_names_the_line(tmp_path):
    good = json.dumps({"instruction": "a", "output": "b"}).encode()
    msg = error(tmp_path, "latin1.jsonl", good + b"\n" + good + b'\n{"instruction": "caf\xe9", "output": "x"}\n')
    assert "latin1.jsonl line 3: not UTF-8 text (byte 0xe9" in msg and "save it as UTF-8" in msg


def test_a_folder_given_as_the_data_file(tmp_path):
    msg = error(tmp_path, "data.jsonl", None)
    assert "data.jsonl: a folder, not a file" in msg and ".jsonl/.json/.csv/.parquet" in msg


@pytest.mark.parametrize("line,kind", [("[1, 2]", "a JSON array"), ('"text"', "a JSON string"), ("3", "a number"),
                                       ("null", "null"), ("true", "true/false")])
def test_json_lines_that_are_not_objects(tmp_path, line, kind):
    msg = error(tmp_path, "d.jsonl", b'{"text": "a"}\n\n' + line.encode() + b"\n")
    assert f"d.jsonl line 3: {kind}, not an object; each line must be one JSON object" in msg


def test_a_json_object_file_and_a_list_of_non_objects(tmp_path):
    assert "a JSON object; expected a list of rows" in error(tmp_path, "o.json", b'{"text": "a"}')
    assert "item 2 of its list: a JSON array, not an object" in error(tmp_path, "l.json", b'[{"text": "a"}, [1]]')


def test_broken_json_names_line_and_column(tmp_path):
    msg = error(tmp_path, "b.jsonl", b'{"text": "a"}\r\n{"text": "b",}\r\n')
    assert "b.jsonl line 2: not valid JSON" in msg and "column 14" in msg


def test_an_empty_file(tmp_path):
    assert "no rows" in error(tmp_path, "e.jsonl", b"\n \n")


# ------------------------------------------------------------------------------------------------------------
# numbers where text is expected: read as their text, and said


def test_numbers_where_text_is_expected_are_read_as_text_and_counted(tmp_path):
    from ftcli.data import NumbersAsText, load_examples

    f = tmp_path / "n.jsonl"
    f.write_bytes(jsonl([{"instruction": "what is 6 × 7", "input": "", "output": 42},
                         {"instruction": 2024, "input": "", "output": "a year"},
                         {"instruction": "fine", "input": "", "output": "text"},
                         {"instruction": "yes?", "input": "", "output": True}]))
    numbers = NumbersAsText()
    examples = load_examples(str(f), "alpaca", {}, numbers=numbers)
    assert [ex.messages[-1]["content"] for ex in examples] == ["42", "a year", "text", "true"]
    assert examples[1].messages[0]["content"] == "2024"
    assert numbers.count == 3
    assert numbers.first == ["n.jsonl line 1: output: 42", "n.jsonl line 2: instruction: 2024",
                             "n.jsonl line 4: output: True"]
    chat = tmp_path / "c.jsonl"
    chat.write_bytes(jsonl([{"messages": [{"role": "user", "content": "2 + 2"}, {"role": "assistant", "content": 4}]}]))
    choice = tmp_path / "q.jsonl"
    choice.write_bytes(jsonl([{"question": "2 + 2", "choices": [3, 4.0], "answer": 1}]))
    numbers = NumbersAsText()
    assert load_examples(str(chat), "chat", {}, numbers=numbers)[0].messages[-1]["content"] == "4"
    assert load_examples(str(choice), "choice", {}, numbers=numbers)[0].choices == ["3", "4.0"]
    assert numbers.first == ["c.jsonl line 1: messages[1].content: 4",
                             "q.jsonl line 1: choices[0]: 3, choices[1]: 4.0"]


def test_check_says_numbers_were_read_as_text(tmp_path, tiny_model_dir, run_cli):
    from conftest import make_recipe

    f = tmp_path / "n.jsonl"
    f.write_bytes(jsonl([{"instruction": f"what is {i} + {i}", "input": "", "output": 2 * i} for i in range(12)]))
    code, out, err = run_cli("check", make_recipe(tmp_path, tiny_model_dir, f))
    assert code == 0, err
    said = " ".join(out.split())
    assert "12 rows had a number where text is expected, read as text (n.jsonl line 1: output: 0;" in said


def test_an_unreadable_file(tmp_path, monkeypatch):
    """Permission denied (simulated: the tests may run as root, whom file modes do not stop)."""
    import errno
    from pathlib import Path

    f = tmp_path / "locked.jsonl"
    f.write_bytes(jsonl(ROWS))

    def refuse(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(UserError, match="locked.jsonl: cannot be read \\(Permission denied\\)"):
        read_rows(str(f))
