"""Load rows from wherever the user keeps them: one call, one `RowSet`, errors that say where.

Accepted sources (see `load_rows`): a `.jsonl` / `.json` / `.parquet` file; a directory written by
`datasets` `save_to_disk` (a `Dataset` or a `DatasetDict`, from which `split` is taken); a directory of
jsonl/json/parquet files; a hub id `org/name` found in the local Hugging Face cache (nothing is
downloaded); a `list[dict]`; a `datasets.Dataset` / `DatasetDict`.

Rows are plain Python dicts. Deliberately left out: streaming and lazy loading. The datasets of
post-training fit in memory, and validating every row before step 0 needs them all anyway.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IN_MEMORY = "<in-memory>"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# Split names recognised in file and folder names of a data directory (`data/train-00000.parquet`).
KNOWN_SPLITS = ("train", "test", "validation", "valid", "dev", "eval")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DataError(ValueError):
    """Bad input data. The message names the origin, the 1-based row, the field and what to do."""

    def __init__(self, origin: str, row: int | None, field: str | None, message: str):
        self.origin, self.row, self.field, self.detail = origin, row, field, message
        where = origin if origin != IN_MEMORY else "in-memory dataset"
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be used, and why: reported, written to the run's bad_rows.jsonl, and dropped, or the
    run stops before step 0 when there are more than `data.max_bad_fraction` of them."""

    origin: str
    row: int  # 1-based: the line of a JSON-lines file, else the row's position
    field: str | None
    reason: str
    excerpt: str = ""  # the row's first characters (never the whole of a huge row)

    def __str__(self) -> str:
        return f"row {self.row}" + (f", field {self.field!r}" if self.field else "") + f": {self.reason}"

    def to_dict(self) -> dict:
        return {"origin": self.origin, "row": self.row, "field": self.field, "reason": self.reason,
                "excerpt": self.excerpt}


def excerpt(value: Any, n: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)[: n + 1]
    return text[:n] + ("..." if len(text) > n else "")


@dataclass
class RowSet:
    """Rows of one dataset split and where they came from (used in every error message).

    `bad` holds the lines that could not be read as rows at all (invalid JSON or UTF-8, a truncated last line);
    `numbers` the 1-based line of each row when they differ from its position (JSON lines with such lines or
    blank ones), so every message names the line a user finds in the file."""

    rows: list[dict]
    origin: str  # file path / dataset dir / hub id / "<in-memory>"
    bad: list[BadRow] = field(default_factory=list)
    numbers: list[int] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def number(self, i: int) -> int:
        """The 1-based row (or line) number of rows[i] in its origin."""
        return self.numbers[i] if self.numbers is not None else i + 1

    @property
    def total(self) -> int:
        """Rows read, the unreadable ones included."""
        return len(self.rows) + len(self.bad)

    def head(self, n: int) -> "RowSet":
        """The first `n` rows (data.limit), with the unreadable lines among them."""
        if n >= len(self.rows):
            return self
        last = self.number(n - 1)
        return RowSet(self.rows[:n], self.origin, [b for b in self.bad if b.row <= last],
                      self.numbers[:n] if self.numbers is not None else None)

    def without(self, drop: set[int]) -> "RowSet":
        """The rows whose positions are not in `drop` (numbers kept), no unreadable lines."""
        keep = [i for i in range(len(self.rows)) if i not in drop]
        return RowSet([self.rows[i] for i in keep], self.origin, [], [self.number(i) for i in keep])


def load_rows(source: Any, *, split: str = "train") -> RowSet:
    """Read every row of `source` (see the module docstring for the accepted kinds) into memory."""
    if isinstance(source, RowSet):
        return source
    if isinstance(source, list):
        return _from_list(source)
    if _is_hf_dataset(source):
        return _from_hf(source, split, IN_MEMORY)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.exists():
            return _from_path(path, split)
        if isinstance(source, str) and _HUB_ID.match(source) and path.suffix not in DATA_SUFFIXES:
            return _from_hub_cache(source, split)
        raise DataError(str(source), None, None,
                        "the path does not exist; give a .jsonl/.json/.parquet file, a dataset directory, "
                        "or a hub id 'org/name' already in the local Hugging Face cache")
    raise DataError(IN_MEMORY, None, None,
                    f"cannot load rows from a {type(source).__name__}; give a path, a hub id, a list of dicts "
                    "or a datasets.Dataset")


# ---------------------------------------------------------------- in-memory sources

def _from_list(rows: list) -> RowSet:
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(IN_MEMORY, i, None, f"each row must be a dict of columns, got {type(row).__name__}")
    return RowSet(rows=list(rows), origin=IN_MEMORY)


def _is_hf_dataset(obj: Any) -> bool:
    # Checked by name so that plain lists and paths never import `datasets` (a slow import).
    return type(obj).__name__ in ("Dataset", "DatasetDict") and type(obj).__module__.startswith("datasets")


def _from_hf(ds: Any, split: str, origin: str) -> RowSet:
    if type(ds).__name__ == "DatasetDict":
        if split not in ds:
            raise DataError(origin, None, None,
                            f"split {split!r} not found; available splits: {', '.join(sorted(ds)) or 'none'}")
        ds = ds[split]
    return RowSet(rows=ds.to_list(), origin=origin)


# ---------------------------------------------------------------- files and directories

def _from_path(path: Path, split: str) -> RowSet:
    if path.is_dir():
        return _from_dir(path, split)
    return _read_file(path)


def _read_file(path: Path) -> RowSet:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return RowSet(_read_parquet(path), str(path))
    raise DataError(str(path), None, None,
                    f"unsupported file type {suffix or '(none)'!r}; use one of {', '.join(DATA_SUFFIXES)}")


def _read_jsonl(path: Path, data: bytes | None = None) -> RowSet:
    """One JSON object per line; blank lines are skipped. A line that is not valid UTF-8, not valid JSON or
    not an object is a bad row (its line number and reason), not an error here: the run decides what to do
    with bad rows once it knows all of them."""
    data = path.read_bytes() if data is None else data
    rows, numbers, bad = [], [], []
    lines = data.split(b"\n")
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(BadRow(str(path), line_no, None, f"not valid UTF-8 ({e.reason} at byte {e.start}); "
                                                        "re-save the file as UTF-8",
                              excerpt(raw[:200].decode("utf-8", "replace"))))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            last = line_no == len(lines)  # no newline after it: the file was cut off while being written
            why = "a truncated last line (the file ends inside it)" if last else "not valid JSON"
            bad.append(BadRow(str(path), line_no, None, f"{why}: {e.msg} at column {e.colno}; each line must "
                                                        "hold one JSON object", excerpt(line)))
            continue
        if not isinstance(row, dict):
            bad.append(BadRow(str(path), line_no, None, f"holds a JSON {type(row).__name__}, not an object of "
                                                        "columns", excerpt(line)))
            continue
        rows.append(row)
        numbers.append(line_no)
    return RowSet(rows, str(path), bad, numbers if numbers != list(range(1, len(rows) + 1)) else None)


def _read_json(path: Path) -> RowSet:
    """A JSON array of objects, or JSON lines saved under a .json name."""
    data = path.read_bytes()
    try:
        data = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return _read_jsonl(path, data)
    except json.JSONDecodeError:
        return _read_jsonl(path, data)  # several top-level values: JSON lines
    if isinstance(data, dict):
        data = [data]  # a single object is a one-line JSON-lines file
    if not isinstance(data, list):
        raise DataError(str(path), None, None, f"expected a JSON array of objects, got a JSON {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(str(path), i, None,
                            f"array element is a JSON {type(row).__name__}, not an object of columns")
    return RowSet(data, str(path))


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(str(path), None, None, f"cannot read Parquet file ({e}); check that it is complete") from e


def _from_dir(path: Path, split: str) -> RowSet:
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        import datasets

        return _from_hf(datasets.load_from_disk(str(path)), split, str(path))
    files = _split_files(path, split)
    rows: list[dict] = []
    bad: list[BadRow] = []
    for f in files:
        part = _read_file(f)
        rows.extend(part.rows)
        bad.extend(part.bad)
    return RowSet(rows=rows, origin=str(path), bad=bad)


def _split_of(file: Path, root: Path) -> str | None:
    """The split a data file belongs to by its folder or file name (`train/`, `train.jsonl`, `train-0001.parquet`)."""
    parts = file.relative_to(root).parts
    for part in parts[:-1]:
        if part in KNOWN_SPLITS:
            return part
    head = re.split(r"[-_.]", file.name, maxsplit=1)[0]
    return head if head in KNOWN_SPLITS else None


def _split_files(root: Path, split: str) -> list[Path]:
    """Data files of `split` under `root`, sorted; all files when none is named after a split.

    When some files are named after splits, only the files of `split` are read (others are ignored).
    """
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and not _hidden(p, root))
    if not files:
        raise DataError(str(root), None, None,
                        f"the directory holds no {', '.join(DATA_SUFFIXES)} files and is not a saved dataset")
    splits = {f: _split_of(f, root) for f in files}
    named = {s for s in splits.values() if s is not None}
    if not named:
        return files
    chosen = [f for f in files if splits[f] == split]
    if not chosen:
        raise DataError(str(root), None, None,
                        f"no files for split {split!r}; files are named for splits: {', '.join(sorted(named))}")
    return chosen


# JSON files that describe a dataset rather than hold its rows (hub repos and `datasets` write them).
METADATA_FILES = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")


def _hidden(p: Path, root: Path) -> bool:
    # Skips `.cache/` and friends that `datasets` and editors leave beside data files, and metadata.
    return p.name in METADATA_FILES or any(part.startswith(".") for part in p.relative_to(root).parts)


# ---------------------------------------------------------------- hub cache (offline)

def hub_cache_dir() -> Path:
    """The hub cache, read from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _from_hub_cache(repo_id: str, split: str) -> RowSet:
    """A dataset snapshot in the hub cache, else one `datasets` prepared earlier. Never downloads."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        snapshot = snapshot_download(repo_id, repo_type="dataset", local_files_only=True, cache_dir=str(cache))
    except Exception:  # not cached (huggingface_hub raises several types); try the datasets cache next
        snapshot = None
    if snapshot is not None:
        rowset = _from_dir(Path(snapshot), split)
        return RowSet(rows=rowset.rows, origin=f"{repo_id} ({snapshot})", bad=rowset.bad)
    try:
        import datasets

        return _from_hf(datasets.load_dataset(repo_id, split=split), split, repo_id)
    except DataError:
        raise
    except Exception as e:
        folder = "datasets--" + repo_id.replace("/", "--")
        raise DataError(repo_id, None, None,
                        f"not a local path, and the dataset is not in the local cache: looked for {cache / folder} "
                        f"(with refs/main) and in the datasets cache ({type(e).__name__}: {e}). Download it first "
                        "(e.g. `huggingface-cli download --repo-type dataset ID`) or pass a file path") from e
