"""Reading rows: local jsonl / json / csv / parquet files and hub datasets, through `datasets`."""

from __future__ import annotations

from pathlib import Path

from ftcli.errors import UserError

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_rows(source: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """All rows of a file or hub dataset as plain dicts (the first `limit` when given)."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    suffix = path.suffix.lower()
    if path.exists() or suffix in LOADERS:
        if not path.is_file():
            raise UserError(f"data file {source}: no such file")
        if suffix not in LOADERS:
            raise UserError(f"data file {source}: unknown type {suffix!r}; use one of {', '.join(LOADERS)}")
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


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
