"""Table I/O (pyarrow; no torch here): filesystems, input discovery, whole-file reads,
record-batch streams, and atomic writes.

Every path may be a local path or a URI on any filesystem pyarrow supports (`s3://`, `gs://`,
`hdfs://`, `file://`), resolved by `pyarrow.fs.FileSystem.from_uri` and listed with
`pyarrow.fs.FileSelector`. A location is a `Path` for local files and a URI string otherwise.

`write_stream` feeds record batches into one `pyarrow.parquet.ParquetWriter` whose schema is
fixed before the first row, under a hidden temporary name beside the target, moved into place
on success; on any error the temporary file is removed. Locally the move is an atomic rename.
On object stores (S3, GCS) the move is a server-side copy: the target key appears whole or not
at all, never half-written, and `batch.score_files` publishes `_SUCCESS` only after every
output. Batch scoring on top of this lives in `batch.py`.
"""
from __future__ import annotations

import contextlib
import csv
import fnmatch
import functools
import glob
import io as _stdio
import logging
import os
import posixpath
import queue
import re
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".pq", ".csv")
MANIFEST = "_manifest.json"             # written by batch.score_files; its folders are not inputs
_TMP_MARK = ".tmp-"
_ARROW_ERRORS = (pa.ArrowException, OSError, ValueError)
Location = Union[Path, str]             # a local Path, or a URI such as s3://bucket/key
_OBJECT_STORES = ("s3", "gcs")          # pyarrow type names of filesystems without atomic rename
T = TypeVar("T")
U = TypeVar("U")


# ------------------------------------------------------------------ filesystems
def is_uri(path: str | os.PathLike) -> bool:
    """True for a URI on a non-local filesystem (s3://, gs://, hdfs://, ...); file:// is local."""
    scheme, sep, _ = os.fspath(path).partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() != "file"


def location(path: str | os.PathLike) -> Location:
    """A local `Path` (file:// URIs included), or the URI string without a trailing slash."""
    if isinstance(path, Path):
        return path
    raw = os.fspath(path)
    if raw.lower().startswith("file://"):
        return Path(pafs.FileSystem.from_uri(raw)[1])
    if is_uri(raw):
        scheme, _, rest = raw.partition("://")
        return f"{scheme.lower()}://{rest.rstrip('/')}"
    return Path(raw)


@functools.lru_cache(maxsize=32)
def _remote(authority: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path of the authority's root) for 'scheme://netloc', made once per process
    (an S3 client resolves the bucket's region on creation). Credentials, region and endpoint
    come from the filesystem's usual environment (AWS_* variables, ~/.aws, GOOGLE_*, ...)."""
    try:
        fs, root = pafs.FileSystem.from_uri(authority + "/")
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{authority}: cannot open this filesystem: {_one_line(exc)}") from exc
    return fs, root.rstrip("/")


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) for a local path or URI."""
    loc = location(path)
    if isinstance(loc, Path):
        return pafs.LocalFileSystem(), os.path.abspath(loc)
    scheme, _, rest = loc.partition("://")
    netloc, _, key = rest.partition("/")
    fs, root = _remote(f"{scheme}://{netloc}")
    return fs, f"{root}/{key}" if key else (root or "/")


def is_object_store(path: str | os.PathLike) -> bool:
    """True where rename is not atomic (S3, GCS): outputs are published by copy, then _SUCCESS."""
    return filesystem(path)[0].type_name in _OBJECT_STORES


def join(base: str | os.PathLike, *parts: str) -> Location:
    """`base`/part/... on base's filesystem ('.' and '..' parts are normalised)."""
    loc = location(base)
    if isinstance(loc, Path):
        return Path(os.path.normpath(loc.joinpath(*parts)))
    scheme, _, rest = loc.partition("://")
    netloc, _, key = rest.partition("/")
    key = posixpath.normpath(posixpath.join("/" + key, *parts)).lstrip("/")
    return f"{scheme}://{netloc}/{key}" if key else f"{scheme}://{netloc}"


def basename(path: str | os.PathLike) -> str:
    return location(path).name if isinstance(location(path), Path) else posixpath.basename(str(path).rstrip("/"))


def parent(path: str | os.PathLike) -> Location:
    loc = location(path)
    return loc.parent if isinstance(loc, Path) else join(loc, "..")


def relative_dir(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """Posix path of folder `path` below `root` ('.' when equal); both on one filesystem."""
    a, b = location(path), location(root)
    if isinstance(a, Path) and isinstance(b, Path):
        return Path(os.path.relpath(os.path.abspath(a), os.path.abspath(b))).as_posix()
    return posixpath.relpath("/" + str(a).partition("://")[2], "/" + str(b).partition("://")[2])


def canonical(path: str | os.PathLike) -> str:
    """One string per file: the resolved local path, or the URI (manifest keys, equality)."""
    loc = location(path)
    return str(loc.resolve()) if isinstance(loc, Path) else loc


def file_type(path: str | os.PathLike) -> pafs.FileType:
    fs, p = filesystem(path)
    try:
        return fs.get_file_info(p).type
    except _ARROW_ERRORS as exc:
        raise DataError(f"{path}: cannot look it up: {_one_line(exc)}") from exc


def is_file(path: str | os.PathLike) -> bool:
    return file_type(path) == pafs.FileType.File


def fingerprint(path: str | os.PathLike) -> dict[str, float]:
    """Size (bytes) and modification time (s since the epoch) of a file, for --resume."""
    loc = location(path)
    if isinstance(loc, Path):
        st = loc.stat()
        return {"size": st.st_size, "mtime": st.st_mtime}
    fs, p = filesystem(loc)
    info = fs.get_file_info(p)
    if info.type != pafs.FileType.File:
        raise DataError(f"{loc}: no such file")
    return {"size": info.size, "mtime": (info.mtime_ns or 0) / 1e9}


def makedirs(path: str | os.PathLike) -> None:
    """Create a folder and its parents (object stores have no folders: nothing to do)."""
    fs, p = filesystem(path)
    if fs.type_name not in _OBJECT_STORES:
        fs.create_dir(p, recursive=True)


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def delete(path: str | os.PathLike) -> None:
    """Delete a file if it exists."""
    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


# ------------------------------------------------------------------ inputs
def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[Location]:
    """Files, directories (searched recursively for *.parquet / *.pq / *.csv) and globs -> file list.

    Each path may be local or a URI (s3://bucket/incoming/, gs://..., hdfs://...). Hidden
    files and names starting with '_' (manifests, temporaries, _SUCCESS) inside directories and
    globs are skipped, and so are hidden / '_' subdirectories and subdirectories holding a
    scoring manifest (an output directory inside the input directory is not read back).
    Hive partition folders (dt=2026-01-01/) are plain folders here: their files are found, the
    partition value is not added as a column. Raises DataError naming the path when something
    does not exist, or when nothing is left.
    """
    return [f for f, _ in expand_inputs_with_roots(paths)]


def expand_inputs_with_roots(paths: Sequence[str | os.PathLike]) -> list[tuple[Location, Location]]:
    """`expand_inputs`, with the root of each file: the directory argument it was found under,
    the fixed leading folders of its glob, or its own folder when named directly. Scoring
    mirrors each file's path below its root, so outputs do not depend on which files are
    present on a given night."""
    out: list[tuple[Location, Location]] = []
    for raw in paths:
        p = location(raw)
        kind = file_type(p)
        if kind == pafs.FileType.Directory:
            found = _walk(p)
            if not found:
                raise DataError(f"{p}: directory has no {'/'.join(SUFFIXES)} files (searched recursively)")
            out.extend((f, p) for f in found)
        elif kind == pafs.FileType.File:
            out.append((p, parent(p)))
        elif glob.has_magic(str(raw)):
            fixed, found = _glob(p)
            if not found:
                raise DataError(f"{raw}: pattern matches no {'/'.join(SUFFIXES)} files")
            out.extend((f, fixed) for f in found)
        else:
            raise DataError(f"{raw}: no such file or directory")
    seen: set[str] = set()
    unique = []
    for f, r in out:
        key = canonical(f)
        if key not in seen:
            seen.add(key)
            unique.append((f, r))
    if not unique:
        raise DataError("no input files given")
    return unique


def _listing(root: Location) -> list[str]:
    """Posix paths (below `root`) of every file under `root`, listed by pyarrow.fs."""
    fs, base = filesystem(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except _ARROW_ERRORS as exc:
        raise DataError(f"{root}: cannot list: {_one_line(exc)}") from exc
    base = base.rstrip("/")
    return [posixpath.relpath(i.path, base) if base else i.path
            for i in infos if i.type == pafs.FileType.File]


def _walk(root: Location) -> list[Location]:
    """Data files under `root`, sorted by path; see `expand_inputs` for what is skipped."""
    rels = _listing(root)
    manifest_dirs = {posixpath.dirname(r) for r in rels if posixpath.basename(r) == MANIFEST}
    manifest_dirs.discard("")                   # the root's own manifest does not hide the root

    def keep(rel: str) -> bool:
        folders = rel.split("/")[:-1]
        if any(d.startswith((".", "_")) for d in folders):
            return False
        if any("/".join(folders[:k]) in manifest_dirs for k in range(1, len(folders) + 1)):
            return False
        return _is_data_file(rel)

    return [join(root, r) for r in sorted((r for r in rels if keep(r)), key=lambda r: r.split("/"))]


def _glob(pattern: Location) -> tuple[Location, list[Location]]:
    """(fixed leading folders, matching data files) of a glob; '**' spans folders."""
    if isinstance(pattern, Path):
        found = sorted(Path(f) for f in glob.glob(str(pattern), recursive=True)
                       if Path(f).is_file() and _is_data_file(f))
        fixed = []
        for part in pattern.parts:
            if glob.has_magic(part):
                break
            fixed.append(part)
        return (Path(*fixed) if fixed else Path(".")), found
    scheme, _, rest = pattern.partition("://")
    parts = rest.split("/")
    k = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    if k == 0:
        raise DataError(f"{pattern}: a pattern in the bucket/host name is not supported")
    fixed = f"{scheme}://{'/'.join(parts[:k])}"
    if file_type(fixed) != pafs.FileType.Directory:
        return fixed, []
    rels = [r for r in _listing(fixed) if _segments_match(parts[k:], r.split("/")) and _is_data_file(r)]
    return fixed, [join(fixed, r) for r in sorted(rels, key=lambda r: r.split("/"))]


def _segments_match(pattern: list[str], parts: list[str]) -> bool:
    """Glob match of path segments: '*', '?', '[..]' within a segment, '**' for any folders."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_segments_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _segments_match(pattern[1:], parts[1:])


def _is_data_file(p: str | os.PathLike) -> bool:
    name = posixpath.basename(os.fspath(p))
    return os.path.splitext(name)[1].lower() in SUFFIXES and not name.startswith((".", "_"))


def _check_unique_columns(path: Location, names: Sequence[str]) -> None:
    """DataError naming the file and every column name that occurs more than once."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{path}: duplicate column name(s) {dupes}; every column needs a unique name "
                        "(rename or drop the duplicates)")


def _is_csv(path: str | os.PathLike) -> bool:
    return os.path.splitext(os.fspath(path))[1].lower() == ".csv"


def _source(path: Location, stream: bool = False) -> tuple[str | pa.NativeFile, dict]:
    """(source, keyword arguments) for pyarrow readers: the local path as it is, or the path on
    a remote filesystem with `filesystem=` (parquet) / an opened stream (CSV, `stream=True`)."""
    if isinstance(path, Path):
        return str(path), {}
    fs, p = filesystem(path)
    return (fs.open_input_stream(p), {}) if stream else (p, {"filesystem": fs})


@contextlib.contextmanager
def _reading(path: Location) -> Iterator[None]:
    """Read errors inside as DataError naming `path`: missing file, or what pyarrow raised
    (`_read_error`: the column too, for CSV conversion errors)."""
    try:
        yield
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file") from exc
    except _ARROW_ERRORS as exc:
        raise _read_error(path, exc) from exc


def _read_error(path: Location, exc: BaseException) -> DataError:
    """DataError naming the file, and for CSV conversion errors the column by name."""
    msg = _one_line(exc)
    if _is_csv(path):
        bad_row = re.search(r"Expected \d+ columns, got \d+", msg)
        if bad_row:      # pyarrow appends the row's text: keep data (card numbers, names) out of logs
            line = _first_ragged_line(path)
            msg = (f"CSV parse error: {bad_row.group(0).lower()}" + (f" on line {line:,}" if line else "")
                   + " (row text not shown)")
        m = re.search(r"CSV column #(\d+)", msg)
        if m:
            try:
                src, _ = _source(path, stream=True)
                with (open(src, newline="") if isinstance(src, str)
                      else _stdio.TextIOWrapper(src, newline="")) as f:
                    header = next(csv.reader(f))
                msg = f"column '{header[int(m.group(1))]}': {msg}"
            except (OSError, StopIteration, IndexError, csv.Error):
                pass
    return DataError(f"{path}: cannot read as {'CSV' if _is_csv(path) else 'parquet'}: {msg}")


def _first_ragged_line(path: Location) -> int | None:
    """Line number (1-based, header = line 1) of the first CSV row whose column count differs
    from the header's; None when it cannot be found."""
    try:
        src, _ = _source(path, stream=True)
        with (open(src, newline="") if isinstance(src, str) else _stdio.TextIOWrapper(src, newline="")) as f:
            reader = csv.reader(f)
            width = len(next(reader))
            for row in reader:
                if row and len(row) != width:
                    return reader.line_num
    except (OSError, StopIteration, csv.Error, UnicodeDecodeError, ValueError):
        return None
    return None


def read_table(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a whole parquet or CSV file into a DataFrame; DataError naming the file on failure."""
    path = location(path)
    input_schema(path)                     # duplicate column names -> DataError naming them
    with _reading(path):
        if _is_csv(path):
            table = pacsv.read_csv(_source(path, stream=True)[0], convert_options=pacsv.ConvertOptions(
                include_columns=list(columns) if columns else None))
        else:
            src, kw = _source(path)
            table = pq.read_table(src, columns=list(columns) if columns else None, **kw)
        return table.to_pandas()


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


SAMPLE_STREAM = 0x5A4D504C         # "ZMPL": the sampling keys' own random stream (`sample_rows`)


def sample_rows(paths: Sequence[str | os.PathLike], max_rows: int | None, *, seed: int = 0,
                batch_size: int = 65536,
                check: Callable[[pa.RecordBatch, Location], None] | None = None,
                progress: Callable[[int], object] | None = None) -> tuple[pd.DataFrame, int]:
    """A uniform random sample of at most `max_rows` rows of all `paths`, streamed in record
    batches so memory tracks the sample, not the data; returns (sample in input order, rows read).

    Bottom-k sampling: every row draws a key in input order and the rows with the `max_rows`
    smallest keys are kept, so the same files, seed and `max_rows` give the same sample. The
    keys come from a stream of their own (`SAMPLE_STREAM` mixed into `seed`), not from
    `default_rng(seed)`: data generated with `default_rng(seed)` (as `anomaly_vae.demo`
    does) would otherwise be sampled by the very numbers that drew it (a biased sample).
    With `max_rows=None` or fewer rows than `max_rows`, every row is kept in order (the same
    table as `read_tables`). `check(batch, path)` sees every batch (e.g. to validate a label
    column in rows the sample leaves out). The files must have the same columns; DataError
    naming the file otherwise.
    """
    if max_rows is not None and max_rows < 1:
        raise DataError(f"max_rows must be positive, got {max_rows}")
    rng = np.random.default_rng([SAMPLE_STREAM, seed])
    kept: list[pa.Table] = []
    keys: list[np.ndarray] = []
    n_kept, total, cut, names = 0, 0, np.inf, None

    def compact() -> None:
        nonlocal kept, keys, n_kept, cut
        table = pa.concat_tables(kept, promote_options="permissive")
        k = np.concatenate(keys)
        order = np.sort(np.argpartition(k, max_rows - 1)[:max_rows])   # positions stay in input order
        kept, keys, n_kept = [table.take(order)], [k[order]], max_rows
        cut = float(keys[0].max())

    for path in expand_inputs(paths):
        schema = input_schema(path)
        if names is None:
            names = schema.names
        elif schema.names != names:
            missing, extra = sorted(set(names) - set(schema.names)), sorted(set(schema.names) - set(names))
            raise DataError(f"{path}: columns differ from the first input (missing {missing}, extra {extra})")
        for rb in iter_batches(path, batch_size):
            if check is not None:
                check(rb, path)
            total += rb.num_rows
            if progress is not None:
                progress(rb.num_rows)
            if max_rows is None:
                kept.append(pa.Table.from_batches([rb]))
                continue
            k = rng.random(rb.num_rows)
            take = np.flatnonzero(k < cut)
            if len(take):
                kept.append(pa.Table.from_batches([rb]).take(take) if len(take) < rb.num_rows
                            else pa.Table.from_batches([rb]))
                keys.append(k[take])
                n_kept += len(take)
            if n_kept >= 2 * max_rows:
                compact()
    if max_rows is not None and n_kept > max_rows:
        compact()
    if not kept:
        table = pa.schema([]).empty_table() if names is None else input_schema(expand_inputs(paths)[0]).empty_table()
    else:
        table = pa.concat_tables(kept, promote_options="permissive")
    return table.to_pandas(), total


def input_schema(path: str | os.PathLike) -> pa.Schema:
    """Arrow schema of a file without reading its rows (CSV: inferred from the first block).

    DataError naming the file when it cannot be read or has duplicate column names.
    """
    path = location(path)
    with _reading(path):
        if _is_csv(path):
            with pacsv.open_csv(_source(path, stream=True)[0]) as reader:
                schema = reader.schema
        else:
            src, kw = _source(path)
            schema = pq.read_schema(src, **kw)
    _check_unique_columns(path, schema.names)
    return schema


def read_small_parquet(path: str | os.PathLike, max_rows: int,
                       columns: Callable[[pa.Schema], Sequence[str] | None]
                       ) -> tuple[pa.Schema, pa.RecordBatch] | None:
    """A parquet file of 1 to `max_rows` rows as (its schema, one record batch of the
    `columns(schema)` it names), from one open of the file (one footer read: on object stores,
    requests cost more than bytes); None for CSV, an empty or a bigger file, or when
    `columns` returns None. Read errors raise DataError naming the file."""
    path = location(path)
    if _is_csv(path):
        return None
    with _reading(path):
        src, kw = _source(path)
        with pq.ParquetFile(src, **kw) as pf:
            n, schema = pf.metadata.num_rows, pf.schema_arrow
            _check_unique_columns(path, schema.names)
            cols = columns(schema) if 0 < n <= max_rows else None
            if cols is None:
                return None
            return schema, pf.read(columns=list(cols), use_threads=False).combine_chunks().to_batches()[0]


def count_rows(path: str | os.PathLike) -> int | None:
    """Row count from parquet metadata (None for CSV or unreadable files)."""
    if _is_csv(path):
        return None
    try:
        src, kw = _source(location(path))
        return pq.ParquetFile(src, **kw).metadata.num_rows
    except _ARROW_ERRORS:
        return None


def iter_batches(path: str | os.PathLike, batch_size: int = 65536,
                 columns: Sequence[str] | None = None,
                 column_types: dict[str, pa.DataType] | None = None,
                 dictionary: Sequence[str] = ()) -> Iterator[pa.RecordBatch]:
    """Stream a parquet or CSV file as record batches of at most `batch_size` rows.

    Only `columns` are read when given. `column_types` fixes CSV column types (otherwise
    inferred from the first block). Parquet columns named in `dictionary` are read as
    dictionary arrays (parquet's own dictionary pages: no string per row; for categoricals).
    Read errors (corrupt file, bad CSV value) raise DataError naming the file (and the
    column, for CSV conversion errors).
    """
    path = location(path)
    if batch_size < 1:
        raise DataError(f"batch size must be positive, got {batch_size}")
    with _reading(path):
        if _is_csv(path):
            opts = pacsv.ConvertOptions(include_columns=list(columns) if columns else None,
                                        column_types=column_types or None)
            with pacsv.open_csv(_source(path, stream=True)[0], convert_options=opts) as reader:
                for batch in reader:
                    for start in range(0, batch.num_rows, batch_size):
                        yield batch.slice(start, batch_size)
        else:
            # One row group at a time (local files without pre-buffering): the reader's read-ahead
            # of a whole file's column chunks was most of the peak memory (10M rows: 873 -> ~260 MB).
            src, kw = _source(path)
            with pq.ParquetFile(src, **kw, pre_buffer=bool(kw),
                                read_dictionary=list(dictionary) or None) as pf:
                cols = list(columns) if columns is not None else None
                for rg in range(pf.metadata.num_row_groups):
                    yield from pf.iter_batches(batch_size=batch_size, row_groups=[rg], columns=cols)


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `items` in a background thread, at most `depth` items ahead (bounded memory).

    Lets reading/encoding (Arrow and numpy release the GIL) overlap with the consumer's work on
    another core. Items arrive in order; an exception raised by `items` is re-raised here.
    Closing the generator early stops the producer thread.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((None, item)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put((exc, None))
            return
        put((None, done))

    thread = threading.Thread(target=produce, name="anomaly-vae-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            exc, item = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def parallel_map(fn: Callable[[T], U], items: Iterable[T], workers: int = 1) -> Iterator[U]:
    """`map(fn, items)` on `workers` threads, results in input order, at most `workers + 1`
    items in flight (bounded memory). For work that releases the GIL (torch, numpy, Arrow):
    batches of one file are scored on every core. workers=1 runs in the caller's thread. An
    exception from `fn` is re-raised here; leaving early cancels what has not started."""
    if workers <= 1:
        yield from map(fn, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="anomaly-vae-score") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, e.g. a container's or taskset's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def use_system_memory_pool() -> str:
    """Make Arrow allocate with the C library's malloc (`pyarrow.system_memory_pool`) unless
    ARROW_DEFAULT_MEMORY_POOL chooses a pool; returns the pool's backend name. For streaming
    scoring, which allocates and frees the same few MB per batch: pyarrow's default, mimalloc,
    hands freed pages back to the OS and faults them in again. Measured (wide benchmark table,
    `score --no-mlflow`, 2 workers): 10M rows 44.3 s with the system pool, 50.9 s mimalloc,
    48.7 s jemalloc; kernel time 5.4 vs 10.1 s; peak RSS 614 vs 665 MB. This sets pyarrow's
    default only: the console script also sets the variable before pyarrow is imported, so that
    Arrow's C++ code allocates with malloc too (`cli._choose_arrow_allocator`)."""
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        pa.set_memory_pool(pa.system_memory_pool())
    return pa.default_memory_pool().backend_name


# ------------------------------------------------------------------ writing
def temp_path(dst: str | os.PathLike) -> Location:
    """Hidden temporary name beside `dst`, holding the writer's pid (cleaned up by
    `remove_stale_temps` once that process is gone)."""
    return join(parent(dst), f".{basename(dst)}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _writer_alive(name: str) -> bool:
    """Whether the process that named temporary `name` still runs on this machine (names
    without a pid, from older versions, count as stale). A reused pid keeps a stale file:
    safe, never destructive."""
    m = re.search(rf"{re.escape(_TMP_MARK)}(\d+)-[0-9a-f]{{8}}$", name)
    if not m:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_stale_temps(out_dir: str | os.PathLike) -> list[Location]:
    """Delete temporaries left by a killed run in `out_dir` and its subdirectories (on any
    filesystem); returns what was removed. Temporaries of a process that still runs (another
    live run, e.g. one writing into a subdirectory) are never touched."""
    out_dir = location(out_dir)
    if file_type(out_dir) != pafs.FileType.Directory:
        return []
    fs, _ = filesystem(out_dir)
    removed = []
    for rel in _listing(out_dir):
        name = posixpath.basename(rel)
        if name.startswith(".") and _TMP_MARK in name and not _writer_alive(name):
            stale = join(out_dir, rel)
            try:
                fs.delete_file(filesystem(stale)[1])
            except FileNotFoundError:
                continue
            removed.append(stale)
    return removed


def publish(dst: str | os.PathLike, write: Callable[[pafs.FileSystem, str], None]) -> Location:
    """Run `write(fs, tmp)` to fill a hidden temporary file beside `dst`, then move it to `dst`.

    Locally the move is an atomic rename. On object stores it is a server-side copy (S3
    CopyObject), which also makes `dst` appear whole or not at all; a run killed before the
    move leaves only the hidden temporary (removed by `remove_stale_temps`). On any error the
    temporary is deleted and `dst` is left as it was.
    """
    dst = location(dst)
    fs, dst_path = filesystem(dst)
    makedirs(parent(dst))
    tmp = temp_path(dst)
    tmp_path = filesystem(tmp)[1]
    try:
        write(fs, tmp_path)
        if isinstance(dst, Path):
            os.replace(tmp_path, dst_path)
        else:
            fs.move(tmp_path, dst_path)
    except BaseException:
        try:
            if fs.get_file_info(tmp_path).type == pafs.FileType.File:
                fs.delete_file(tmp_path)
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    return dst


def fsync_file(path: str) -> None:
    """Flush a local file's data to disk, so that after a crash its name never points at
    missing data: the manifest (fsynced too) may then say "done" only of outputs that are whole.
    Measured 0.3 ms a file on an ext4 VM disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(dst: str | os.PathLike, data: bytes) -> Location:
    """Write `data` to `dst` atomically (`publish`); local files are fsynced before the rename."""
    def write(fs: pafs.FileSystem, tmp: str) -> None:
        if isinstance(location(dst), Path):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
    return publish(dst, write)


def write_stream(dst: str | os.PathLike, schema: pa.Schema,
                 batches: Iterable[pa.RecordBatch | pa.Table], *, plain: Sequence[str] = ()) -> int:
    """Write batches to parquet at `dst` atomically (temporary name, then `publish`'s move).
    Returns rows written. `plain`: columns (names, or leaf paths such as
    ``explanation.list.element.text``) written without dictionary encoding, for values that are
    nearly all distinct (keys, float scores, free text): the writer tries a dictionary on every
    column first, which for those costs time and makes the file bigger.

    If anything fails (including the iterator that produces the batches), the temporary
    file is removed and `dst` is left as it was.
    """
    rows = 0
    plain = tuple(plain)
    dictionary: bool | list[str] = True
    if plain:
        dictionary = [p for p in parquet_leaf_paths(schema)
                      if not any(p == c or p.startswith(c + ".") for c in plain)]

    local = isinstance(location(dst), Path)

    def write(fs: pafs.FileSystem, tmp: str) -> None:
        nonlocal rows
        writer = pq.ParquetWriter(tmp, schema, compression="snappy", use_dictionary=dictionary,
                                  filesystem=None if local else fs)
        try:
            for batch in batches:
                writer.write(batch)
                rows += batch.num_rows
        finally:
            writer.close()
        if local:
            fsync_file(tmp)

    publish(dst, write)
    return rows


@functools.lru_cache(maxsize=32)
def parquet_leaf_paths(schema: pa.Schema) -> tuple[str, ...]:
    """The parquet column paths of an Arrow schema ('a', 's.x', 'l.list.element.y', ...), as
    the writer's per-column options name them (read off an empty file written in memory; cached,
    as every output file of a run has the same schema)."""
    buf = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), buf)
    meta = pq.ParquetFile(pa.BufferReader(buf.getvalue())).schema
    return tuple(meta.column(i).path for i in range(len(meta)))


def write_frame(df: pd.DataFrame, dst: str | os.PathLike) -> int:
    """Write a DataFrame to parquet (or CSV when dst ends in .csv) atomically."""
    if _is_csv(dst):
        def write(fs: pafs.FileSystem, tmp: str) -> None:
            with fs.open_output_stream(tmp) as f:
                f.write(df.to_csv(index=False).encode())
        publish(dst, write)
        return len(df)
    table = pa.Table.from_pandas(df, preserve_index=False)
    return write_stream(dst, table.schema, [table])


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
