"""Table I/O (pyarrow; no torch here): input discovery, whole-file reads, record-batch
streams, and atomic writes.

`write_stream` feeds record batches into one `pyarrow.parquet.ParquetWriter` whose schema is
fixed before the first row, under a hidden temporary name renamed into place on success; on any
error the temporary file is removed. Batch scoring on top of this lives in `batch.py`.
"""
from __future__ import annotations

import csv
import glob
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".pq", ".csv")
MANIFEST = "_manifest.json"             # written by batch.score_files; its folders are not inputs
_TMP_MARK = ".tmp-"
_ARROW_ERRORS = (pa.ArrowException, OSError, ValueError)


# ------------------------------------------------------------------ inputs
def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files, directories (searched recursively for *.parquet / *.pq / *.csv) and globs -> file list.

    Hidden files and names starting with '_' (manifests, temporaries) inside directories and
    globs are skipped, and so are hidden / '_' subdirectories and subdirectories holding a
    scoring manifest (an output directory inside the input directory is not read back).
    Raises DataError naming the path when something does not exist, or when nothing is left.
    """
    return [f for f, _ in expand_inputs_with_roots(paths)]


def expand_inputs_with_roots(paths: Sequence[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """`expand_inputs`, with the root of each file: the directory argument it was found under,
    the fixed leading folders of its glob, or its own folder when named directly. Scoring
    mirrors each file's path below its root, so outputs do not depend on which files are
    present on a given night."""
    out: list[tuple[Path, Path]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = _walk(p)
            if not found:
                raise DataError(f"{p}: directory has no {'/'.join(SUFFIXES)} files (searched recursively)")
            out.extend((f, p) for f in found)
        elif p.is_file():
            out.append((p, p.parent))
        elif glob.has_magic(str(raw)):
            found = sorted(Path(f) for f in glob.glob(str(raw), recursive=True)
                           if Path(f).is_file() and _is_data_file(Path(f)))
            if not found:
                raise DataError(f"{raw}: pattern matches no {'/'.join(SUFFIXES)} files")
            fixed = []
            for part in p.parts:
                if glob.has_magic(part):
                    break
                fixed.append(part)
            out.extend((f, Path(*fixed) if fixed else Path(".")) for f in found)
        else:
            raise DataError(f"{raw}: no such file or directory")
    seen: set[Path] = set()
    unique = [(f, r) for f, r in out if not (f.resolve() in seen or seen.add(f.resolve()))]
    if not unique:
        raise DataError("no input files given")
    return unique


def _walk(root: Path) -> list[Path]:
    """Data files under `root`, sorted by path; see `expand_inputs` for what is skipped."""
    found = []
    for d, subdirs, files in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if not s.startswith((".", "_"))
                            and not (Path(d) / s / MANIFEST).is_file())
        found += [Path(d) / f for f in files if _is_data_file(Path(d) / f) and (Path(d) / f).is_file()]
    return sorted(found)


def _is_data_file(p: Path) -> bool:
    return p.suffix.lower() in SUFFIXES and not p.name.startswith((".", "_"))


def _check_unique_columns(path: Path, names: Sequence[str]) -> None:
    """DataError naming the file and every column name that occurs more than once."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{path}: duplicate column name(s) {dupes}; every column needs a unique name "
                        "(rename or drop the duplicates)")


def _is_csv(path: Path) -> bool:
    return Path(path).suffix.lower() == ".csv"


def _read_error(path: Path, exc: BaseException) -> DataError:
    """DataError naming the file, and for CSV conversion errors the column by name."""
    msg = _one_line(exc)
    if _is_csv(path):
        m = re.search(r"CSV column #(\d+)", msg)
        if m:
            try:
                with open(path, newline="") as f:
                    header = next(csv.reader(f))
                msg = f"column '{header[int(m.group(1))]}': {msg}"
            except (OSError, StopIteration, IndexError, csv.Error):
                pass
    return DataError(f"{path}: cannot read as {'CSV' if _is_csv(path) else 'parquet'}: {msg}")


def read_table(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a whole parquet or CSV file into a DataFrame; DataError naming the file on failure."""
    path = Path(path)
    input_schema(path)                     # duplicate column names -> DataError naming them
    try:
        if _is_csv(path):
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                include_columns=list(columns) if columns else None))
        else:
            table = pq.read_table(path, columns=list(columns) if columns else None)
        return table.to_pandas()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file") from exc
    except _ARROW_ERRORS as exc:
        raise _read_error(path, exc) from exc


def read_tables(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Read and concatenate several files; they must have the same columns."""
    frames = []
    for p in expand_inputs(paths):
        df = read_table(p)
        if frames and list(df.columns) != list(frames[0].columns):
            missing = sorted(set(frames[0].columns) - set(df.columns))
            extra = sorted(set(df.columns) - set(frames[0].columns))
            raise DataError(f"{p}: columns differ from the first input (missing {missing}, extra {extra})")
        frames.append(df)
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def input_schema(path: str | os.PathLike) -> pa.Schema:
    """Arrow schema of a file without reading its rows (CSV: inferred from the first block).

    DataError naming the file when it cannot be read or has duplicate column names.
    """
    path = Path(path)
    try:
        if _is_csv(path):
            with pacsv.open_csv(path) as reader:
                schema = reader.schema
        else:
            schema = pq.read_schema(path)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file") from exc
    except _ARROW_ERRORS as exc:
        raise _read_error(path, exc) from exc
    _check_unique_columns(path, schema.names)
    return schema


def count_rows(path: str | os.PathLike) -> int | None:
    """Row count from parquet metadata (None for CSV or unreadable files)."""
    if _is_csv(Path(path)):
        return None
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except _ARROW_ERRORS:
        return None


def iter_batches(path: str | os.PathLike, batch_size: int = 65536,
                 columns: Sequence[str] | None = None,
                 column_types: dict[str, pa.DataType] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream a parquet or CSV file as record batches of at most `batch_size` rows.

    Only `columns` are read when given. `column_types` fixes CSV column types (otherwise
    inferred from the first block). Read errors (corrupt file, bad CSV value) raise
    DataError naming the file (and the column, for CSV conversion errors).
    """
    path = Path(path)
    if batch_size < 1:
        raise DataError(f"batch size must be positive, got {batch_size}")
    try:
        if _is_csv(path):
            opts = pacsv.ConvertOptions(include_columns=list(columns) if columns else None,
                                        column_types=column_types or None)
            with pacsv.open_csv(path, convert_options=opts) as reader:
                for batch in reader:
                    for start in range(0, batch.num_rows, batch_size):
                        yield batch.slice(start, batch_size)
        else:
            with pq.ParquetFile(path) as pf:
                yield from pf.iter_batches(batch_size=batch_size,
                                           columns=list(columns) if columns is not None else None)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file") from exc
    except _ARROW_ERRORS as exc:
        raise _read_error(path, exc) from exc


# ------------------------------------------------------------------ writing
def temp_path(dst: Path) -> Path:
    """Hidden temporary name beside `dst` (cleaned up by `remove_stale_temps`)."""
    return dst.parent / f".{dst.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}"


def remove_stale_temps(out_dir: str | os.PathLike) -> list[Path]:
    """Delete temporaries left by a killed run in `out_dir` and its subdirectories; returns
    what was removed."""
    removed = []
    for p in Path(out_dir).rglob(f".*{_TMP_MARK}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_stream(dst: str | os.PathLike, schema: pa.Schema,
                 batches: Iterable[pa.RecordBatch | pa.Table]) -> int:
    """Write batches to parquet at `dst` atomically (temp name, then rename). Returns rows written.

    If anything fails (including the iterator that produces the batches), the temporary
    file is removed and `dst` is left as it was.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dst)
    writer = None
    rows = 0
    try:
        writer = pq.ParquetWriter(tmp, schema, compression="snappy")
        for batch in batches:
            writer.write(batch)
            rows += batch.num_rows
        writer.close()
        writer = None
        os.replace(tmp, dst)
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        tmp.unlink(missing_ok=True)
        raise
    return rows


def write_frame(df: pd.DataFrame, dst: str | os.PathLike) -> int:
    """Write a DataFrame to parquet (or CSV when dst ends in .csv) atomically."""
    dst = Path(dst)
    if _is_csv(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(dst)
        try:
            df.to_csv(tmp, index=False)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return len(df)
    table = pa.Table.from_pandas(df, preserve_index=False)
    return write_stream(dst, table.schema, [table])

def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
