"""Reading rows: local jsonl / json / csv / parquet files and hub datasets.

JSON and CSV files are read with Python's own parsers, not `datasets`: its loaders infer column types, which
silently turns a string such as "1974-02-09" into a timestamp ("1974-02-09 00:00:00") and "007" into 7 —
exactly the values a fine-tuning set must keep verbatim. Parquet files and hub datasets carry their own types
and go through `datasets`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ftcli.errors import UserError

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class Rows(list):
    """Rows (dicts) and where each is in its file, as a person finds it: "line 12" of a JSON lines or CSV file
    (the line its record starts on), "item 3" of a .json list, "row 7" (its index) of a parquet file or hub set."""

    def __init__(self, rows, places: list[str] | None = None):
        super().__init__(rows)
        self.places = places if places is not None else [f"row {i}" for i in range(len(rows))]

    def place(self, i: int) -> str:
        return self.places[i]

    def head(self, n: int | None) -> "Rows":
        return self if n is None else Rows(self[:n], self.places[:n])


def read_rows(source: str, split: str = "train", limit: int | None = None) -> Rows:
    """All rows of a file or hub dataset as plain dicts (the first `limit` when given), with their places."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.exists() or suffix in LOADERS:
        if path.is_dir():
            raise UserError(f"data file {source}: a folder, not a file; give one {'/'.join(LOADERS)} file")
        if not path.is_file():
            raise UserError(f"data file {source}: no such file")
        if suffix not in LOADERS:
            raise UserError(f"data file {source}: unknown type {suffix!r}; use one of {', '.join(LOADERS)}")
        if suffix in (".jsonl", ".json", ".csv"):
            rows = _read_text_rows(path, suffix)
            if not rows:
                raise UserError(f"data {source}: no rows")
            return rows.head(limit)
    import datasets  # only for parquet and the hub: it costs a second to import (progress bars: logs.quiet)

    if path.exists():
        try:
            ds = datasets.load_dataset(LOADERS[suffix], data_files=str(path), split="train")
        except Exception as e:  # datasets wraps parser errors several levels deep
            raise UserError(f"data file {source}: could not be read: {_root_cause(e)}") from None
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:
            from ftcli.models import offline_mode

            why = ("offline mode is on (HF_HUB_OFFLINE), so the hub is not contacted" if offline_mode() else
                   f"could not be loaded from the hub ({_root_cause(e)})")
            raise UserError(
                f"dataset {source!r}: not a local file, and {why}. Point data.train at a local "
                ".jsonl/.json/.csv/.parquet file."
            ) from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    rows = ds.to_list()
    if not rows:
        raise UserError(f"data {source}: no rows")
    return Rows(rows)


def read_text(path: Path, what: str = "data file", hint: str = "save it as UTF-8 JSON lines, JSON or CSV") -> str:
    """A text file as UTF-8 (a leading byte-order mark dropped); anything else is a UserError naming the line and
    byte where it stops being UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{what} {path}: cannot be read ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        kind = "a binary file" if b"\0" in data[:8192] else "not UTF-8 text"
        raise UserError(f"{what} {path} line {line}: {kind} (byte 0x{data[e.start]:02x} at offset {e.start:,} "
                        f"is not UTF-8); {hint}") from None


def jsonl_lines(text: str):
    """(line number, line) of JSON lines text, split on "\n" only: JSON strings may hold U+0085, U+2028 and
    U+2029, which str.splitlines() would also split at. A "\r" before the "\n" (Windows) is dropped; blank
    lines are skipped."""
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield n, line


def _read_text_rows(path: Path, suffix: str) -> Rows:
    text = read_text(path)
    if suffix == ".csv":
        # newline="": quoted fields keep their own line breaks (and U+2028 and kin are not line breaks in CSV)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows, places, line = [], [], 1  # the header is line 1
        for row in reader:
            rows.append(row)
            places.append(f"line {line + 1}")
            line = reader.line_num
        return Rows(rows, places)
    if suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None  # perhaps JSON lines in a .json file
        if isinstance(doc, list):
            return _check_objects(doc, path)
        if isinstance(doc, dict):
            raise UserError(f"data file {path}: a JSON object; expected a list of rows or one JSON object per line")
    rows, places = [], []
    for n, line in jsonl_lines(text):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"data file {path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"data file {path} line {n}: {_json_kind(row)}; each line must be one JSON object, "
                            'e.g. {"instruction": ..., "output": ...}')
        rows.append(row)
        places.append(f"line {n}")
    return Rows(rows, places)


def _check_objects(rows: list, path: Path) -> Rows:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"data file {path} item {i + 1} of its list: {_json_kind(row)}; each item must be a "
                            "JSON object")
    return Rows(rows, [f"item {i + 1}" for i in range(len(rows))])


def _json_kind(value) -> str:
    """What a JSON value is, in words."""
    kinds = {list: "a JSON array", str: "a JSON string", bool: "true/false", int: "a number", float: "a number",
             type(None): "null"}
    return f"{kinds.get(type(value), type(value).__name__)}, not an object"


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
