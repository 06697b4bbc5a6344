"""Streaming batch scoring of files (pyarrow; the detector does the math).

Each input streams Arrow record batches through the detector into one output parquet written
by `io.write_stream` (fixed schema, temporary name, renamed on success), so memory tracks the
batch size, not the file size. A manifest (`_manifest.json` in the output directory) records
the model and every input's outcome and makes a run resumable.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from .errors import AnomalyVAEError, DataError, LockedError, SchemaMismatchError
from . import io
from . import score as S
from .explain import EXPLANATION_TYPE
from .schema import validate_arrow
from .io import (MANIFEST, _is_csv, _one_line, count_rows, input_schema, iter_batches, parallel_map, prefetch,
                 remove_stale_temps, write_stream)

if TYPE_CHECKING:
    from .detector import VAEAnomalyDetector
    from .preprocess import Encoded

log = logging.getLogger(__name__)

SCORE_FIELDS = (
    pa.field("anomaly_score", pa.float64()),
    pa.field("recon_nll", pa.float64()),
    pa.field("kl", pa.float64()),
    pa.field("p_value", pa.float64()),
    pa.field("is_anomaly", pa.bool_()),
    pa.field("top_features", pa.string()),
    pa.field("explanation", EXPLANATION_TYPE),   # flagged rows: value + expected value per column
)
SCORE_COLUMNS = tuple(f.name for f in SCORE_FIELDS)
# nearly all distinct values: no dictionary encoding (`io.write_stream`; with the ids, 1M wide rows
# were written in 0.60 s instead of 0.97 s and took 45 MB instead of 54 MB)
PLAIN_COLUMNS = ("anomaly_score", "recon_nll", "kl", "top_features", "explanation.list.element.contribution",
                 "explanation.list.element.text")
MANIFEST_FORMAT = "anomaly-vae-scores"
OUTPUT_SUFFIX = ".scored.parquet"
MANIFEST_SHARE = 0.1           # the manifest is rewritten after each input, unless that takes more of the run
SUCCESS = "_SUCCESS"            # written last, when every input of a run is scored
LOCK_FILE = "_score.lock"       # held by the run writing into a (local) output directory


# ------------------------------------------------------------------ scoring
ENCODE_ROWS = 16384      # rows encoded and scored at a time inside a batch (memory per worker)
MIN_SHARE_ROWS = 4096    # rows per thread at least, when a pool of small files is scored
BATCH_ROWS = 32768       # default record batch: 10M wide rows peak at 937 MB vs 1,091 MB with 65536, same speed


def output_path(src: str | os.PathLike, out_dir: str | os.PathLike) -> io.Location:
    """DIR/<stem>.scored.parquet for an input file (local path or URI)."""
    return io.join(out_dir, f"{os.path.splitext(io.basename(src))[0]}{OUTPUT_SUFFIX}")


def output_paths(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 roots: Sequence[str | os.PathLike] | None = None) -> list[io.Location]:
    """The output file of each input: DIR/<path below its root>/<stem>.scored.parquet, where
    the root is the directory or glob prefix the input was found under (`io.expand_inputs_with_roots`;
    default: the input's own folder, i.e. flat names). So `score incoming/` writes
    incoming/dt=2026-01-01/part-0.parquet to DIR/dt=2026-01-01/part-0.scored.parquet on every
    night, whichever other files are present. DataError when two inputs map to one output."""
    roots = roots if roots is not None else [io.parent(p) for p in inputs]
    targets = [io.join(out_dir, io.relative_dir(io.parent(p), r), io.basename(output_path(p, out_dir)))
               for p, r in zip(inputs, roots)]
    dupes = sorted(str(t) for t, n in collections.Counter(targets).items() if n > 1)
    if dupes:
        clash = [str(p) for p, t in zip(inputs, targets) if str(t) in dupes]
        raise DataError(f"inputs {clash} would all be written to {dupes}; rename one of them, pass "
                        "their common folder instead of the files, or score them into separate "
                        "output directories")
    return targets


def _plan_columns(det: "VAEAnomalyDetector", src: io.Location, keep: str, *, quiet: bool = False,
                  schema: pa.Schema | None = None) -> tuple[pa.Schema, list[str], list[str], list[str]]:
    """Check the input's columns against the model; return (input schema, columns to read,
    pass-through columns, warnings). A model id column missing from the input is a warning
    (logged unless `quiet`, and returned), not an error: the rows are still scored, in input order.
    `schema`: the input's, when the caller has read it."""
    if keep not in ("ids", "all"):
        raise DataError(f"keep must be 'ids' or 'all', got {keep!r}")
    schema = schema if schema is not None else input_schema(src)
    names = schema.names
    features = [c.name for c in det.schema_.features]
    missing = [c for c in features if c not in names]
    if missing:
        raise SchemaMismatchError(
            f"{src}: missing required column(s) {missing}; the model was trained on {features}")
    warnings = []
    absent = [c for c in det.schema_.ids if c not in names]
    if absent:
        warnings.append(f"{src}: id column(s) {absent} not in the input, so the output has no key "
                        "column to join on (rows stay in input order)")
    passthrough = list(names) if keep == "all" else [c for c in det.schema_.ids if c in names]
    clash = [c for c in passthrough if c in SCORE_COLUMNS]
    if clash:
        warnings.append(f"{src}: input column(s) {clash} are replaced by the new scores")
        passthrough = [c for c in passthrough if c not in SCORE_COLUMNS]
    for w in [] if quiet else warnings:
        log.warning("%s", w)
    read = list(dict.fromkeys(passthrough + features))
    return schema, read, passthrough, warnings


def _dictionary_columns(det: "VAEAnomalyDetector", in_schema: pa.Schema, passthrough: Sequence[str]) -> list[str]:
    """The string categoricals to read as dictionaries: ~10% faster to read and encode
    (categories are looked up once per batch, not once per row)."""
    return [c.name for c in det.schema_.features if c.kind == "categorical"
            and c.name in in_schema.names and c.name not in passthrough
            and (pa.types.is_string(in_schema.field(c.name).type)
                 or pa.types.is_large_string(in_schema.field(c.name).type))]


def _arrow_type(dtype: str) -> pa.DataType:
    """Arrow type for a pandas dtype name saved in the model schema (text when unsure)."""
    try:
        return pa.from_numpy_dtype(np.dtype(str(dtype).lower()))
    except (TypeError, ValueError, pa.ArrowException):
        return pa.string()


def output_schema(input_schema: pa.Schema, passthrough: Sequence[str] = ()) -> pa.Schema:
    """Schema of `score_batch` output: the pass-through fields of `input_schema`, then SCORE_FIELDS."""
    return pa.schema([input_schema.field(c) for c in passthrough] + list(SCORE_FIELDS))


def score_batch(det: "VAEAnomalyDetector", batch: pa.RecordBatch, passthrough: Sequence[str] = (), *,
                schema: pa.Schema | None = None) -> pa.RecordBatch:
    """Score one Arrow record batch: the `passthrough` columns (unchanged) + SCORE_FIELDS.

    A pure function of the model and the batch (the same rows give the same output whatever
    batch they arrive in), so one code path serves the CLI's streaming loop, pyfunc serving and
    Spark `mapInArrow` on executors. `batch` holds at least the model's feature columns (extra
    columns are ignored). `schema` (default `output_schema(batch.schema, passthrough)`) fixes
    the output types; pass-through columns are cast to it. Bad values raise an AnomalyVAEError
    naming the column. (n rows) -> (n rows).
    """
    schema = schema if schema is not None else output_schema(batch.schema, passthrough)
    return _score_sliced(det, batch, passthrough, schema, lambda off, n: nullcontext())


def _encode_batch(det: "VAEAnomalyDetector", batch: pa.RecordBatch) -> "Encoded":
    """Validate the batch's feature columns (Arrow, no pandas copy) and encode them, one-hot
    blocks as indices (`preprocess.Encoded`)."""
    return det.preprocessor_.encode_compact(validate_arrow(det.schema_, batch))


def _output_batch(batch: pa.RecordBatch, cols: dict[str, Any], passthrough: Sequence[str],
                  schema: pa.Schema) -> pa.RecordBatch:
    """The output record batch: pass-through columns, then `FittedDetector.score_columns`."""
    arrays = [_conform(batch.column(c), schema.field(c).type) for c in passthrough]
    arrays += [_conform(cols[f.name], f.type) if isinstance(cols[f.name], pa.Array)
               else pa.array(cols[f.name], type=f.type, from_pandas=True) for f in SCORE_FIELDS]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _score_sliced(det: "VAEAnomalyDetector", batch: pa.RecordBatch, passthrough: Sequence[str],
                  schema: pa.Schema, rows: Callable[[int, int], Any]) -> pa.RecordBatch:
    """`score_batch` for a batch of any size: rows are encoded and run through the network in
    slices of ENCODE_ROWS (a worker's encoded rows and network buffers stay small whatever
    --batch-size is), keeping only the flagged rows' encoding; scores, top_features and the
    explanations are then made once for the whole batch (their cost is mostly per call).
    `rows(offset, n)` is the context that names the slice in a data error."""
    terms, kept, flagged_at = [], [], []
    for off in range(0, batch.num_rows, ENCODE_ROWS):
        part = batch.slice(off, ENCODE_ROWS)
        with rows(off, part.num_rows):
            X = _encode_batch(det, part)
            t = det._terms_from_X(X)
        flagged = np.flatnonzero(t.anomaly_score > det.threshold_)
        terms.append(t)
        kept.append(X.dense(flagged))
        flagged_at.append(flagged + off)
    with rows(0, batch.num_rows):
        cols = det.score_columns(merge_terms(terms), values=batch, X=np.concatenate(kept),
                                 X_rows=np.concatenate(flagged_at))
    return _output_batch(batch, cols, passthrough, schema)


def merge_terms(terms: Sequence[S.ScoreTerms]) -> S.ScoreTerms:
    """The ScoreTerms of consecutive slices of rows as one (column_kl: zeros where a slice had none)."""
    if len(terms) == 1:
        return terms[0]
    kl_of = [t.column_kl for t in terms]
    if any(k is not None for k in kl_of):
        kl_of = [k if k is not None else np.zeros(t.column_nll.shape) for k, t in zip(kl_of, terms)]
    return S.ScoreTerms(*(np.concatenate([getattr(t, f) for t in terms]) for f in S.ScoreTerms._fields[:4]),
                        None if kl_of[0] is None else np.concatenate(kl_of))


@contextmanager
def _rows(src: "io.Location", start: int, n: int) -> Iterator[None]:
    """Re-raise a data error with the file and the batch's row range in front."""
    try:
        yield
    except AnomalyVAEError as exc:
        msg = str(exc).removeprefix("input: ")
        raise type(exc)(f"{src} (rows {start:,}-{start + n - 1:,}): {msg}") from exc


def score_file(det: "VAEAnomalyDetector", src: str | os.PathLike, dst: str | os.PathLike, *,
               keep: str = "ids", batch_size: int = BATCH_ROWS,
               progress: Callable[[int], Any] | None = None, workers: int | None = None,
               on_batch: Callable[[pa.RecordBatch, pa.RecordBatch], Any] | None = None,
               pooled: "Pooled | None" = None) -> dict[str, Any]:
    """Score one file in record batches into parquet `dst` (temp name + rename).

    Output columns: the pass-through columns (the model's id columns with keep="ids", every
    input column with keep="all") followed by anomaly_score, recon_nll, kl, p_value,
    is_anomaly, top_features, explanation. `progress(n)` is called with each batch's row count;
    `on_batch(input_batch, scored_batch)` with each batch, in order, before it is written (on
    the writer's thread; the input batch holds the pass-through and feature columns), e.g. a
    `monitor.ScoringMonitor` gathering drift statistics without a second pass.
    `workers` threads score batches in parallel (default: every CPU this process may use; the
    output does not depend on it: each batch is scored on its own, results in order).
    Bad input raises an AnomalyVAEError naming the file and column; no output is left behind.
    An input with no rows gives an empty output with the same columns and types, and a warning.
    Returns stats: input, output, rows_in, rows_out, flagged, seconds, status, warnings.
    `pooled`: this file's rows as `score_pool` read and scored them with other small files;
    they are written (with the same checks, counts and hooks) instead of read and scored again.
    """
    src, dst = io.location(src), io.location(dst)
    if io.canonical(src) == io.canonical(dst):
        raise DataError(f"{src}: output path is the input file")
    t0 = time.perf_counter()
    in_schema, read_cols, passthrough, warnings = _plan_columns(
        det, src, keep, schema=pooled.schema if pooled is not None else None)
    features = [c.name for c in det.schema_.features]
    # CSV: numeric features read as float64 throughout (no int -> float surprises mid-file)
    csv_types = {c.name: pa.float64() for c in det.schema_.features if c.kind == "numeric"}
    if _is_csv(src):
        # a column with no values in the first block (header-only file) is inferred as null:
        # use the type the model saw at fit instead, so empty and non-empty outputs match
        csv_types.update({c.name: _arrow_type(c.dtype) for c in det.schema_.columns
                          if c.name in in_schema.names and c.name not in csv_types
                          and pa.types.is_null(in_schema.field(c.name).type)})
        in_schema = pa.schema([pa.field(f.name, csv_types.get(f.name, f.type)) for f in in_schema])
    out_schema = output_schema(in_schema, passthrough)
    as_dictionary = _dictionary_columns(det, in_schema, passthrough)
    counts = {"rows": 0, "flagged": 0}
    nulls = dict.fromkeys(features, 0)

    # three stages, each at most a few batches ahead (bounded memory): read (one thread) |
    # validate + encode + network + scores + explanation (`workers` threads; torch, numpy and
    # Arrow release the GIL; the encoded rows live only inside a worker) | parquet write (the
    # caller's thread)
    def read() -> Iterator[tuple[int, pa.RecordBatch]]:
        start = 0
        for batch in iter_batches(src, batch_size, columns=read_cols, column_types=csv_types,
                                  dictionary=as_dictionary):
            if batch.num_rows:
                yield start, batch
                start += batch.num_rows

    def score(item: tuple[int, pa.RecordBatch]) -> tuple[pa.RecordBatch, pa.RecordBatch]:
        start, batch = item
        if pooled is not None:
            return batch, pooled.scored
        return batch, _score_sliced(det, batch, passthrough, out_schema,
                                    lambda off, n: _rows(src, start + off, n))

    # a file of one batch (many small files): scored in this thread; the stages' threads and
    # hand-offs cost more than they overlap (a 250-row file: 29.8 -> 22.4 ms in score_file)
    items = read() if pooled is None else iter([(0, pooled.batch)])
    head = list(itertools.islice(items, 2))
    staged = len(head) > 1
    items = itertools.chain(head, items)

    def batches() -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
        scoring = (parallel_map(score, prefetch(items, depth=1), workers or io.cpu_count()) if staged
                   else map(score, items))
        for batch, scored in scoring:
            n = batch.num_rows
            counts["rows"] += n
            counts["flagged"] += scored.column("is_anomaly").true_count
            for c in features:
                nulls[c] += batch.column(c).null_count
            if progress is not None:
                progress(n)
            yield batch, scored

    def observed() -> Iterator[pa.RecordBatch]:
        for batch, scored in prefetch(batches()) if staged else batches():
            if on_batch is not None:
                on_batch(batch, scored)
            yield scored

    rows_out = write_stream(dst, out_schema, observed(), plain=[*det.schema_.ids, *PLAIN_COLUMNS])
    seconds = time.perf_counter() - t0 + (pooled.seconds if pooled is not None else 0.0)
    if rows_out == 0:
        warnings.append(f"{src}: no rows; wrote an empty {io.basename(dst)}")
        log.warning("%s", warnings[-1])
    empty = [c for c, k in nulls.items() if rows_out and k == counts["rows"]]
    if empty:   # usually a broken upstream export, not a wave of anomalies
        warnings.append(f"{src}: column(s) {empty} are null in every row; each row is scored as "
                        "missing there")
        log.warning("%s", warnings[-1])
    return {"input": str(src), "output": str(dst), "rows_in": counts["rows"], "rows_out": rows_out,
            "flagged": counts["flagged"], "seconds": round(seconds, 3), "status": "done",
            "warnings": warnings}


@dataclass(frozen=True)
class Pooled:
    """One file's share of a pool (`score_pool`): its schema, its rows as read, their scores,
    the file's fingerprint when it was read, and its share of the pool's seconds."""
    schema: pa.Schema
    batch: pa.RecordBatch
    scored: pa.RecordBatch
    fingerprint: dict[str, Any]
    seconds: float


def score_pool(det: "VAEAnomalyDetector", candidates: Iterator[tuple[int, io.Location]], *,
               keep: str = "ids", batch_size: int = BATCH_ROWS, workers: int | None = None
               ) -> tuple[dict[int, Pooled], int | None]:
    """Read consecutive small parquet inputs and score them as one batch (each batch has a
    fixed cost, ~10-15 ms for the wide table: 1,000-row files were scored at a quarter of a big
    file's rate). `candidates`: (index, input) in run order. The pool takes them while they
    are parquet files with rows, the first one's schema and at most `batch_size` rows in all.
    Returns ({index: Pooled} for two or more files, else {}; the index at which to try the
    next pool: the first candidate not taken, or the one after the first candidate when none
    was; None when all were taken). Anything odd (an unreadable file, a bad value) ends or
    drops the pool, never raises: those files are then scored one by one, which names the
    file and row at fault. Each file's output has the same bits as when it is scored alone
    (`model.pad_rows`). The pool's rows are split between `workers` threads (default every
    CPU), at least MIN_SHARE_ROWS each."""
    t0 = time.perf_counter()
    taken: list[tuple[int, tuple[pa.Schema, pa.RecordBatch], dict[str, Any]]] = []
    rows, first, stop, head = 0, None, None, None

    def columns(src: io.Location, schema: pa.Schema) -> list[str] | None:
        """The columns to read from `src`, if it joins the pool (the first file's schema)."""
        nonlocal first
        plan = _plan_columns(det, src, keep, quiet=True, schema=schema)
        if first is None:
            first = plan
        return plan[1] if plan[0] == first[0] and plan[1:3] == first[1:3] else None

    for index, src in _until_error(candidates):
        head = index if head is None else head
        try:
            fingerprint = _fingerprint(src)
            read = io.read_small_parquet(src, batch_size - rows, functools.partial(columns, src))
        except Exception:  # noqa: BLE001 - this file is scored (and its error reported) on its own
            read = None
        if read is None:
            stop = index
            break
        taken.append((index, read, fingerprint))
        rows += read[1].num_rows
    if not taken:
        return {}, None if head is None else head + 1
    if len(taken) < 2:
        return {}, stop
    in_schema, _, passthrough, _ = first
    out_schema = output_schema(in_schema, passthrough)
    try:
        whole = pa.concat_batches([b for _, (_, b), _ in taken])
        workers = max(1, min(workers or io.cpu_count(), rows // MIN_SHARE_ROWS))
        share = -(-rows // workers)
        scored = pa.concat_batches(list(parallel_map(
            lambda off: _score_sliced(det, whole.slice(off, share), passthrough, out_schema,
                                      lambda o, n: nullcontext()),
            range(0, rows, share), workers)))
    except Exception:  # noqa: BLE001 - one bad file: each is scored on its own, the bad one fails
        log.debug("a pool of %d small inputs failed; scoring them one by one", len(taken), exc_info=True)
        return {}, stop
    seconds = time.perf_counter() - t0
    log.debug("scored inputs %d-%d (%d small files, %d rows) as one pool in %.3f s",
              taken[0][0] + 1, taken[-1][0] + 1, len(taken), rows, seconds)
    out, offset = {}, 0
    for index, (schema, b), fingerprint in taken:
        out[index] = Pooled(schema, b, scored.slice(offset, b.num_rows), fingerprint, seconds * b.num_rows / rows)
        offset += b.num_rows
    return out, stop


def _until_error(items: Iterator[Any]) -> Iterator[Any]:
    """`items` until it ends or raises (whoever asks for that item again gets the error)."""
    try:
        yield from items
    except Exception:  # noqa: BLE001
        return


def _conform(arr: pa.Array | pa.ChunkedArray, typ: pa.DataType) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr if arr.type == typ else arr.cast(typ)


def encode_files(det: "VAEAnomalyDetector", inputs: Sequence[io.Location], dst: str | os.PathLike, *,
                 batch_size: int = 65536, progress: Callable[[int], Any] | None = None) -> int:
    """Latent means z0..z{k-1} (plus the model's id columns) of every input row into one parquet
    file, streamed in record batches and written atomically. Returns the number of rows."""
    features = [c.name for c in det.schema_.features]
    plans = [_plan_columns(det, io.location(p), "ids") for p in inputs]
    first_schema, _, ids, _ = plans[0]
    k = int(det.config_.latent_dim)
    out_schema = pa.schema([first_schema.field(c) for c in ids]
                           + [pa.field(f"z{j}", pa.float32()) for j in range(k)])

    def batches() -> Iterator[pa.RecordBatch]:
        for src, (_, read_cols, passthrough, _) in zip(inputs, plans):
            if passthrough != ids:
                raise DataError(f"{src}: id columns {passthrough} differ from the first input's {ids}")
            start = 0
            for batch in iter_batches(src, batch_size, columns=read_cols):
                if batch.num_rows == 0:
                    continue
                try:
                    z = det.encode(batch.select(features).to_pandas())
                except AnomalyVAEError as exc:
                    msg = str(exc).removeprefix("input: ")
                    raise type(exc)(f"{src} (rows {start:,}-{start + batch.num_rows - 1:,}): {msg}") from exc
                arrays = [_conform(batch.column(c), out_schema.field(c).type) for c in ids]
                arrays += [pa.array(np.ascontiguousarray(z[:, j], dtype=np.float32)) for j in range(k)]
                start += batch.num_rows
                if progress is not None:
                    progress(batch.num_rows)
                yield pa.RecordBatch.from_arrays(arrays, schema=out_schema)

    return write_stream(dst, out_schema, batches())


# ------------------------------------------------------------------ manifest
def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a previous run in `out_dir`, or None. DataError if it is unreadable."""
    path = io.join(out_dir, MANIFEST)
    if not io.is_file(path):
        return None
    try:
        data = json.loads(io.read_bytes(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable manifest ({_one_line(exc)}); delete it or drop --resume") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not an anomaly-vae scoring manifest")
    return data


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> io.Location:
    """Write `_manifest.json` atomically (temp file, fsync, rename; on object stores a
    temporary key copied into place)."""
    manifest["updated"] = _now()
    return io.write_bytes(io.join(out_dir, MANIFEST), json.dumps(manifest, indent=1, default=str).encode())


def _input_key(src: io.Location) -> str:
    return io.canonical(src)


def _fingerprint(src: io.Location) -> dict[str, Any]:
    return io.fingerprint(src)


def _same_file(recorded: str | None, path: io.Location) -> bool:
    """Whether a manifest's recorded output path names `path` (older manifests hold a local
    path as typed: relative to the cwd of that run)."""
    return bool(recorded) and io.canonical(recorded) == io.canonical(path)


def _output_name(dst: io.Location) -> str:
    """How an entry records its output: an absolute local path (any later cwd finds it), or the URI."""
    return os.path.abspath(dst) if isinstance(dst, Path) else str(dst)


def model_digest(det: "VAEAnomalyDetector") -> str:
    """sha256 of what decides a fitted model's scores: schema, preprocessing, config, threshold,
    calibration and weights. The same for a model before saving, after loading and through
    MLflow; different after a retrain with another seed or data. Identifies the model in a
    scoring manifest, so `--resume` cannot mix two models' scores."""
    h = hashlib.sha256()
    meta = {"schema": det.schema_.to_dict(), "preprocess": det.preprocessor_.to_dict(),
            "config": det.config_.to_dict(), "threshold": float(det.threshold_)}
    h.update(json.dumps(meta, sort_keys=True, default=str, allow_nan=True).encode())
    for name in ("calibration_scores_", "column_median_", "typical_x_"):
        value = getattr(det, name, None)
        h.update(name.encode() + (b"-" if value is None else np.ascontiguousarray(value).tobytes()))
    for key, tensor in sorted(det.vae_.state_dict().items()):
        h.update(key.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def is_done(entry: dict[str, Any] | None, src: io.Location, dst: io.Location | None = None,
            model_sha256: str | None = None) -> bool:
    """A manifest entry marks `src` finished: status done, output present (at `dst`, when given,
    however the path was typed) with the recorded row count, written by the model with
    `model_sha256` (when given), and the input unchanged since (size and mtime)."""
    if not entry or entry.get("status") != "done":
        return False
    if model_sha256 is not None and entry.get("model_sha256") not in (None, model_sha256):
        return False
    out = entry.get("output") or ""
    if dst is not None and not _same_file(out, dst):
        return False
    if not out or not io.is_file(out) or count_rows(out) != entry.get("rows_out"):
        return False
    fp = _fingerprint(src)
    return entry.get("input_size") == fp["size"] and entry.get("input_mtime") == fp["mtime"]


@contextmanager
def output_lock(out_dir: io.Location, *, wait: bool = False, timeout: float = 3600.0) -> Iterator[None]:
    """Hold `OUT/_score.lock` (filelock) while a run writes into local folder `out_dir`: a second
    run into the same folder raises LockedError at once, or with `wait` after up to `timeout`
    seconds. The OS drops the lock when the holder dies (SIGKILL included). Object stores have
    no locks: nothing is held there (one writer per prefix is the caller's job)."""
    if not isinstance(out_dir, Path):
        yield
        return
    from filelock import FileLock, Timeout

    path = out_dir / LOCK_FILE
    lock = FileLock(str(path), timeout=timeout if wait else 0)
    try:
        lock.acquire()
    except Timeout:
        what = f"gave up after waiting {timeout:g} s" if wait else "try again later or pass --wait"
        raise LockedError(f"{out_dir}: another `score` run is writing into this output directory "
                          f"(lock {path}); {what}") from None
    try:
        yield
    finally:
        lock.release()


def _previous_manifest(out_dir: io.Location, resume: bool) -> dict[str, Any] | None:
    """The manifest already in `out_dir`. With `resume` an unreadable one is an error; without,
    it is replaced (with a warning), since nothing is skipped on its word."""
    try:
        return read_manifest(out_dir)
    except DataError as exc:
        if resume:
            raise
        log.warning("%s; starting a new manifest", exc)
        return None


def _check_same_model(where: io.Location, before: dict[str, Any], model: dict[str, Any]) -> None:
    """DataError unless the manifest's model is the one scoring now (by content)."""
    if before.get("sha256") is None:      # manifest of an older version: only a registry version is safe
        if before.get("version") is not None and (before.get("uri"), before.get("version")) == (
                model["uri"], model["version"]):
            return
        raise DataError(f"{where}: written without a model fingerprint (older anomaly-vae) by "
                        f"{before.get('uri')}; cannot check that {model['uri']} is the same model: use "
                        "another --output directory or drop --resume to rescore every input")
    if before["sha256"] != model["sha256"]:
        raise DataError(f"{where}: written by another model ({before.get('uri')}, sha256 "
                        f"{before['sha256'][:12]}) than {model['uri']} (sha256 {model['sha256'][:12]}); the "
                        "model changed since that run (retrained or replaced), and resuming would mix two "
                        "models' scores: use another --output directory, or drop --resume to rescore "
                        "every input with this model")


def score_files(det: "VAEAnomalyDetector", inputs: Sequence[io.Location], out_dir: str | os.PathLike, *,
                model_info: dict[str, Any] | None = None, keep: str = "ids", batch_size: int = BATCH_ROWS,
                resume: bool = False, progress: bool = False, keep_going: bool = False,
                roots: Sequence[io.Location] | None = None, wait: bool = False,
                wait_timeout: float = 3600.0, workers: int | None = None,
                on_start: Callable[[], Any] | None = None,
                on_batch: Callable[[io.Location, pa.RecordBatch, pa.RecordBatch], Any] | None = None,
                on_input: Callable[[io.Location, str], Any] | None = None) -> dict[str, Any]:
    """Score every input to OUT/<path below its root>/<stem>.scored.parquet (`output_paths`;
    roots default to each input's folder), keeping `_manifest.json` up to date; warnings go to
    each file's entry.

    One run at a time per local output directory (`output_lock`): another one raises
    LockedError, or with `wait` waits for it. Entries of earlier runs stay in the manifest;
    each entry records the model (`model_digest`) that wrote it. With `resume`, inputs that the
    manifest marks done (and whose output is intact) are skipped; the manifest must come from
    the same model (by content), else DataError. Stops at the first failing input (recorded as
    failed) and raises its error; any failure inside one input (also an unexpected one, then
    wrapped in a DataError naming the file) is an AnomalyVAEError. With `keep_going` a failed
    input is recorded and the others are scored: the summary counts them ("failed") and lists
    their one-line errors ("failures"); the caller decides the exit code.
    Returns the manifest plus a "summary" dict.

    Hooks (for a run record such as `scoring_runs.ScoringRun`): `on_start()` is called once the
    output lock is held, before any input is read (so a run locked out never calls it);
    `on_batch(input, input_batch, scored_batch)` with every scored batch (`score_file`);
    `on_input(input, status)` when an input is over ("done", "skipped" or "failed": then
    the batches it had passed to `on_batch` have no output).
    """
    out_dir = io.location(out_dir)
    io.makedirs(out_dir)
    targets = output_paths(inputs, out_dir, roots)
    with output_lock(out_dir, wait=wait, timeout=wait_timeout):
        if on_start is not None:
            on_start()
        return _score_files_locked(det, list(inputs), targets, out_dir, model_info=model_info, keep=keep,
                                   batch_size=batch_size, resume=resume, progress=progress,
                                   keep_going=keep_going, workers=workers, on_batch=on_batch,
                                   on_input=on_input)


def _score_files_locked(det: "VAEAnomalyDetector", inputs: list[io.Location], targets: list[io.Location],
                        out_dir: io.Location, *, model_info: dict[str, Any] | None, keep: str,
                        batch_size: int, resume: bool, progress: bool, keep_going: bool,
                        workers: int | None = None,
                        on_batch: Callable[[io.Location, pa.RecordBatch, pa.RecordBatch], Any] | None = None,
                        on_input: Callable[[io.Location, str], Any] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    def ended(src: io.Location, status: str) -> None:
        if on_input is not None:
            on_input(src, status)

    stale = remove_stale_temps(out_dir)
    if stale:
        log.info("removed %d stale temporary file(s) from an interrupted run", len(stale))
    where = io.join(out_dir, MANIFEST)
    model = {k: (model_info or {}).get(k) for k in ("uri", "name", "version", "run_id")}
    model["sha256"] = digest = model_digest(det)
    previous = _previous_manifest(out_dir, resume)
    if resume and previous is not None:
        _check_same_model(where, previous.get("model") or {}, model)
    files = dict((previous or {}).get("files", {}))
    writers: dict[str, list[str]] = {}        # output -> the done entries that wrote it (one lookup per input)
    for other, e in files.items():
        if e.get("status") == "done" and e.get("output"):
            writers.setdefault(io.canonical(e["output"]), []).append(other)
    keys = [_input_key(src) for src in inputs]
    for src, dst, key in zip(inputs, targets, keys):     # refuse before writing anything
        for other in writers.get(io.canonical(dst), ()):
            if other == key or other not in files:
                continue
            if resume:
                raise DataError(f"{dst}: already holds the scores of {other} ({where}); scoring "
                                f"{src} there would overwrite them: use another --output directory")
            log.warning("%s: overwriting the scores of %s with those of %s", dst, other, src)
            del files[other]
    manifest = {
        "format": MANIFEST_FORMAT, "version": 1, "model": model,
        "threshold": float(det.threshold_), "keep": keep, "batch_size": batch_size,
        "created": (previous or {}).get("created", _now()), "updated": _now(), "files": files,
    }
    summary = {"files": len(inputs), "scored": 0, "skipped": 0, "failed": 0, "failures": [], "rows": 0,
               "flagged": 0, "seconds": 0.0}
    io.delete(io.join(out_dir, SUCCESS))      # the folder is changing: not complete until the end
    last_end = last_cost = 0.0
    dirty = False

    def save(now: bool = True) -> None:
        """Rewrite the manifest; with now=False only if that keeps the rewrites within
        MANIFEST_SHARE of the run's time (each is a whole JSON file: after every one of many
        small inputs, the run became quadratic in their number)."""
        nonlocal last_end, last_cost, dirty
        dirty = True
        if now or (time.monotonic() - last_end) * MANIFEST_SHARE >= last_cost * (1 - MANIFEST_SHARE):
            start = time.monotonic()
            write_manifest(out_dir, manifest)
            last_end = time.monotonic()
            last_cost, dirty = last_end - start, False

    done_before: dict[int, bool] = {}

    def skip(i: int) -> bool:
        """Whether input i is done from an earlier run (with `resume`; asked once per input)."""
        if i not in done_before:
            done_before[i] = resume and is_done(files.get(keys[i]), inputs[i], targets[i], digest)
        return done_before[i]

    pooled: dict[int, Pooled] = {}
    pool_from: int | None = 0           # the first input the next pool of small inputs may take
    save()
    file_bar = tqdm(total=len(inputs), desc="files", unit="file", disable=not progress or len(inputs) < 2)
    try:
        for i, (src, dst, key) in enumerate(zip(inputs, targets, keys)):
            if skip(i):
                summary["skipped"] += 1
                ended(src, "skipped")
                file_bar.update(1)
                continue
            entry = {"input": str(src), "output": _output_name(dst), "status": "running",
                     "started": _now(), "model_sha256": digest}
            files[key] = entry
            bar = None
            try:
                fp = _fingerprint(src)
                entry.update(input_size=fp["size"], input_mtime=fp["mtime"])
                save(now=False)
                if pool_from is not None and i >= pool_from:
                    pooled, pool_from = score_pool(
                        det, ((j, inputs[j]) for j in range(i, len(inputs)) if not skip(j)),
                        keep=keep, batch_size=batch_size, workers=workers)
                mine = pooled.pop(i, None)
                bar = tqdm(total=count_rows(src) if progress else None, desc=io.basename(src), unit="row",
                           unit_scale=True, leave=False, disable=not progress)
                hook = None if on_batch is None else (lambda b, s, _src=src: on_batch(_src, b, s))
                stats = score_file(det, src, dst, keep=keep, batch_size=batch_size, progress=bar.update,
                                   workers=workers, on_batch=hook,
                                   pooled=mine if mine is not None and mine.fingerprint == fp else None)
            except Exception as exc:  # noqa: BLE001 - one input's failure, whatever it is, is that input's
                err = exc if isinstance(exc, AnomalyVAEError) else _unexpected(src, exc)
                entry.update(status="failed", error=_one_line(err), finished=_now())
                save()
                ended(src, "failed")
                if not keep_going:
                    if err is exc:
                        raise
                    raise err from exc
                log.error("%s", _one_line(err))
                summary["failures"].append(_one_line(err))
                summary["failed"] += 1
                file_bar.update(1)
                continue
            except BaseException as exc:         # KeyboardInterrupt: record, then stop
                entry.update(status="failed", error=_one_line(exc), finished=_now())
                save()
                raise
            finally:
                if bar is not None:
                    bar.close()
            entry.update({k: stats[k] for k in ("rows_in", "rows_out", "flagged", "seconds")},
                         status="done", finished=_now())
            if stats["warnings"]:
                entry["warnings"] = stats["warnings"]
            save(now=False)
            summary["scored"] += 1
            ended(src, "done")
            for k in ("rows", "flagged", "seconds"):
                summary[k] += stats["rows_in" if k == "rows" else k]
            file_bar.update(1)
    finally:
        file_bar.close()
    if dirty:
        save()
    if not summary["failed"]:                 # published last: every output and the manifest are in place
        io.write_bytes(io.join(out_dir, SUCCESS), b"")
    return {**manifest, "summary": summary}


def _unexpected(src: io.Location, exc: BaseException) -> DataError:
    """An error inside one input that is not ours (a library's ValueError on odd data, an
    OSError on a vanished file) as a DataError naming the file; the cause keeps the traceback."""
    log.debug("unexpected error while scoring %s", src, exc_info=exc)
    return DataError(f"{src}: cannot score this file: {type(exc).__name__}: {_one_line(exc)} "
                     "(run with --debug for the traceback)")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
