"""Reading rows: local jsonl / json / csv / parquet files and hub datasets.

JSON and CSV files are read with Python's own parsers, not `datasets`: its loaders infer column types, which
silently turns a string such as "1974-02-09" into a timestamp ("1974-02-09 00:00:00") and "007" into 7 —
exactly the values a fine-tuning set must keep verbatim. Parquet files and hub datasets carry their own types
and go through `datasets`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ftcli.errors import UserError

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_rows(source: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """All rows of a file or hub dataset as plain dicts (the first `limit` when given)."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.exists() or suffix in LOADERS:
        if not path.is_file():
            raise UserError(f"data file {source}: no such file")
        if suffix not in LOADERS:
            raise UserError(f"data file {source}: unknown type {suffix!r}; use one of {', '.join(LOADERS)}")
        if suffix in (".jsonl", ".json", ".csv"):
            rows = _read_text_rows(path, suffix)
            if not rows:
                raise UserError(f"data {source}: no rows")
            return rows[:limit] if limit is not None else rows
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
            raise UserError(
                f"dataset {source!r}: not a local file and could not be loaded from the hub ({_root_cause(e)}). "
                "Offline, point data.train at a local .jsonl/.json/.csv/.parquet file."
            ) from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    rows = ds.to_list()
    if not rows:
        raise UserError(f"data {source}: no rows")
    return rows


def _read_text_rows(path: Path, suffix: str) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None  # perhaps JSON lines in a .json file
        if isinstance(doc, list):
            return _check_objects(doc, path)
        if isinstance(doc, dict):
            raise UserError(f"data file {path}: a JSON object; expected a list of rows or one JSON object per line")
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"data file {path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
    return _check_objects(rows, path)


def _check_objects(rows: list, path: Path) -> list[dict]:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"data file {path} row {i}: expected a JSON object, got {type(row).__name__}")
    return rows


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
