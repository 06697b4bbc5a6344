"""Explanations: the top-k columns of a row with its value and what the model expected there.

For each (row, column) named by the contributions, the expected value is read from the
decoder's likelihood parameters for *this* row (`model.DecoderParams`; at z = mu by default,
or a masked prediction when a variant supplies one):

  numeric     decoder mean and the central 5-95% interval of its Gaussian, back-transformed to
              original units through the preprocessor's inverse transform and clipped to the
              training range
  categorical the most likely category (never <unk>) and its probability
  boolean     the same, as true / false
  datetime    hour of day from the decoded hour sin/cos (no interval)
  missing     a numeric/datetime column whose value is missing where the model expects it present
              ("usually present", p = P(present)), or present where it expects missing

All of it is column-wise numpy and Arrow compute: it runs in batch scoring. Texts of up to
SMALL entries (a scored batch's flagged rows) are joined in Python from the same digits.
The result is an Arrow `list<struct>` (`EXPLANATION_TYPE`), one list per row, largest
contribution first; only columns with a positive contribution are listed.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .preprocess import NULL, UNK, Preprocessor, _inverse_transform
from .score import in_order, top_columns

Z95 = 1.6448536269514722          # standard-normal 95% quantile: central 5-95% interval
# Up to this many entries per call, numbers and texts are joined in Python (a batch's flagged
# rows: Arrow's cost per call, and the GIL it holds between calls, dominate); above, Arrow
# string kernels. Both give the same text.
SMALL = 4096
ENTRY_TYPE = pa.struct([
    pa.field("column", pa.string()),
    pa.field("kind", pa.string()),          # numeric | categorical | boolean | datetime | missing
    pa.field("contribution", pa.float64()),  # nats above the column's median on normal rows
    pa.field("value", pa.string()),          # this row's value as text ("null" when missing)
    pa.field("expected", pa.string()),       # what the model expected, as text
    pa.field("low", pa.float64()),           # numeric: central 5-95% interval, original units
    pa.field("high", pa.float64()),
    pa.field("p", pa.float64()),             # categorical: P(expected); missing: P(expected state)
    pa.field("text", pa.string()),           # e.g. "amount = 4,812.00 (expected 18–95)"
])
EXPLANATION_TYPE = pa.list_(ENTRY_TYPE)
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


class Entries(NamedTuple):
    """The (row, column) pairs to explain, row-major, largest contribution first in each row."""

    row: np.ndarray            # (e,) row position
    column: np.ndarray         # (e,) column position in `Preprocessor.spans`
    contribution: np.ndarray   # (e,) nats
    offsets: np.ndarray        # (n + 1,) int32: row i owns entries offsets[i]:offsets[i+1]


def select_entries(contrib: np.ndarray, k: int, rows: np.ndarray | None = None) -> Entries:
    """The top-k columns of each row with a positive contribution; `rows` (n,) bool limits
    the rows explained (the others get none). (n, c) -> Entries"""
    n = contrib.shape[0]
    at = np.arange(n) if rows is None else np.flatnonzero(rows)      # only these rows' top-k
    idx, vals = top_columns(contrib[at], k)
    keep = vals > 0
    counts = np.zeros(n, dtype=np.int32)
    counts[at] = keep.sum(1)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return Entries(np.repeat(at, idx.shape[1])[keep.ravel()], idx[keep], vals[keep].astype(np.float64), offsets)


def occlude(X: np.ndarray, columns: np.ndarray, owner: np.ndarray, typical: np.ndarray) -> np.ndarray:
    """Copy of X with, in row e, every dim of column columns[e] set to its typical encoded value,
    so the decoder's prediction for that column comes from the other columns. (e, d) -> (e, d)"""
    X = np.array(X, dtype=np.float32, copy=True)
    for j in np.unique(columns):
        dims = np.flatnonzero(owner == j)
        X[np.ix_(np.flatnonzero(columns == j), dims)] = typical[dims]
    return X


def explanations(entries: Entries, params: Sequence[np.ndarray], pre: Preprocessor,
                 values: Mapping[str, pa.Array | pd.Series] | None) -> pa.ListArray:
    """The explanation list of each row. Vectorised over rows and columns: the numbers of each
    column are worked out with numpy (one loop over columns), then every field is formatted
    and every text joined once for all entries of a kind (numeric, datetime, categorical),
    since a batch's flagged rows name most columns and per-call costs dominate at that size.

    params: the four `DecoderParams` arrays with one row per entry (the decoder's prediction
    for that entry's row: at z = mu, occluded, or masked); values: raw input column -> (n,)
    values of all n rows (None leaves `value` null). Returns a ListArray of length n.
    """
    e = len(entries.row)
    if e == 0:
        return pa.ListArray.from_arrays(pa.array(entries.offsets), pa.array([], type=ENTRY_TYPE),
                                        type=EXPLANATION_TYPE)
    f = _numbers(entries, params, pre, values)
    num, dt, cat = (np.flatnonzero(f.kind == k) for k in ("numeric", "datetime", "categorical"))
    name = pa.array([s.column for s in pre.spans], type=pa.string()).take(pa.array(entries.column))

    # numeric: the value, the centre and the 5-95% interval, in original units
    value_num = _fmt(f.value[num], f.value_decimals[num])
    value_num = pc.if_else(pa.array(f.value_missing[num]), pa.scalar("null"), value_num)
    value_num = pc.if_else(pa.array(f.has_raw[num]), value_num, pa.nulls(len(num), pa.string()))
    value = _place(e, [(num, value_num), *f.value_text])
    lo_text = _fmt(f.low[num], f.digits[num])
    interval = pc.if_else(pa.array(f.low[num] == f.high[num]), lo_text,
                          _join([lo_text, "–", _fmt(f.high[num], f.digits[num])]))
    around = _join(["around ", _pad2(f.hour[dt]), ":", _pad2(f.minute[dt])])
    expected = _place(e, [(num, _fmt(f.centre[num], f.digits[num])), (dt, around), *f.expected_text])
    text = _place(e, [
        (num, _join([name.take(num), " = ", value.take(num), " (expected ", interval, ")"])),
        (dt, _join([name.take(dt), " = ", value.take(dt), " (expected ", around, ")"])),
        (cat, _join([name.take(cat), " = ", value.take(cat), " (expected ", expected.take(cat), ", p=",
                     _fmt(f.prob[cat], 2), ")"]))])

    # a missing value, or a value present where the model expects it missing (numeric, datetime)
    expect_missing = f.p_missing >= 0.5
    is_miss = f.value_missing | (expect_missing & f.has_raw)
    state_p = np.where(expect_missing, f.p_missing, 1.0 - f.p_missing)
    miss = np.flatnonzero(is_miss)
    miss_expected = pa.array(np.where(expect_missing[miss], "missing", "present"), type=pa.string())
    miss_text = _join([name.take(miss), " = ", value.take(miss), " (usually ", miss_expected, ", p=",
                       _fmt(state_p[miss], 2), ")"])
    missing = pa.array(is_miss)
    expected = pc.if_else(missing, _place(e, [(miss, miss_expected)]), expected)
    text = pc.if_else(missing, _place(e, [(miss, miss_text)]), text)
    kind = np.where(is_miss, "missing", f.span_kind)
    prob = pa.array(np.where(is_miss, state_p, f.prob), mask=~(is_miss | (f.kind == "categorical")))
    interval_mask = f.kind != "numeric"
    struct = pa.StructArray.from_arrays(
        [name, pa.array(kind, type=pa.string()), pa.array(entries.contribution.astype(np.float64)), value,
         expected, pa.array(f.low, mask=interval_mask), pa.array(f.high, mask=interval_mask), prob, text],
        fields=list(ENTRY_TYPE))
    return pa.ListArray.from_arrays(pa.array(entries.offsets), struct, type=EXPLANATION_TYPE)


def to_frame(explanation: pa.ListArray | pd.Series, index: pd.Index | None = None) -> pd.DataFrame:
    """Long format: one row per (input row, explained column) with `row` (the input's index
    label), `rank` (1 = largest contribution) and the ENTRY_TYPE fields."""
    arr = explanation
    if isinstance(arr, pd.Series):
        index = arr.index if index is None else index
        arr = pa.array(arr)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    parents = pc.list_parent_indices(arr).to_numpy()
    flat = pc.list_flatten(arr)
    out = pd.DataFrame({f.name: flat.field(i).to_numpy(zero_copy_only=False)
                        for i, f in enumerate(ENTRY_TYPE)})
    starts = arr.offsets.to_numpy()[:-1] - arr.offsets[0].as_py()
    out.insert(0, "rank", np.arange(len(parents)) - starts[parents] + 1 if len(parents) else [])
    out.insert(0, "row", (index if index is not None else pd.RangeIndex(len(arr)))[parents])
    return out


# --------------------------------------------------------------- internals
class _Layout:
    """Where each column's decoder parameters sit in the DecoderParams arrays."""

    def __init__(self, pre: Preprocessor) -> None:
        self.numeric = {s.column: s.start for s in pre.spans if s.kind in ("numeric", "datetime")}
        # the numeric block starts at dim 0 and is contiguous, so dim == position in `mean`
        self.indicator = {s.column: int(np.searchsorted(pre.indicator_dims, s.indicator))
                          for s in pre.spans if s.indicator >= 0}
        off, self.categorical = 0, {}
        for s in pre.spans:               # one-hot blocks are concatenated in span order
            if s.kind in ("categorical", "boolean"):
                self.categorical[s.column] = (off, off + s.stop - s.start)
                off += s.stop - s.start


class _Numbers(NamedTuple):
    """Per entry (e,): what `explanations` formats. kind: numeric | datetime | categorical
    (booleans are categorical here; span_kind keeps 'boolean'); value, value_decimals: a
    numeric value and its decimals; centre, low, high, digits: the expected value and interval
    (numeric); hour, minute (datetime); prob: P(expected category); p_missing: P(missing) from
    the indicator (0 without one); value_text / expected_text: (positions, strings) per
    column for the values that are text already."""

    kind: np.ndarray
    span_kind: np.ndarray
    has_raw: np.ndarray
    value: np.ndarray
    value_decimals: np.ndarray
    value_missing: np.ndarray
    centre: np.ndarray
    low: np.ndarray
    high: np.ndarray
    digits: np.ndarray
    hour: np.ndarray
    minute: np.ndarray
    prob: np.ndarray
    p_missing: np.ndarray
    value_text: list
    expected_text: list


def _numbers(entries: Entries, params: Sequence[np.ndarray], pre: Preprocessor,
             values: Mapping[str, pa.Array | pd.Series] | None) -> _Numbers:
    """The numbers of every entry, one column at a time (numpy; the few Arrow calls are the
    per-column conversions of the row values and category names to text)."""
    mean, logvar, ind_logit, cat_logit = params
    layout = _Layout(pre)
    e = len(entries.row)
    span_kind = np.array([s.kind for s in pre.spans], dtype=object)[entries.column]
    nan, zero = (lambda: np.full(e, np.nan)), (lambda dtype: np.zeros(e, dtype=dtype))
    f = _Numbers(kind=np.where(span_kind == "boolean", "categorical", span_kind), span_kind=span_kind,
                 has_raw=zero(bool), value=nan(), value_decimals=zero(np.int64), value_missing=zero(bool),
                 centre=nan(), low=nan(), high=nan(), digits=zero(np.int64), hour=zero(np.int64),
                 minute=zero(np.int64), prob=nan(), p_missing=zero(np.float64), value_text=[],
                 expected_text=[])
    for j in np.unique(entries.column):
        sel = np.flatnonzero(entries.column == j)
        span = pre.spans[j]
        p = pre.params[span.column]
        m = len(sel)
        raw = None if values is None or span.column not in values else values[span.column]
        if isinstance(raw, pd.Series):          # take the m rows first, then convert them
            raw = pa.array(raw.iloc[entries.row[sel]], from_pandas=True)
        elif raw is not None:
            raw = raw.take(pa.array(entries.row[sel]))
            raw = raw.combine_chunks() if isinstance(raw, pa.ChunkedArray) else raw
        f.has_raw[sel] = raw is not None

        if span.kind in ("categorical", "boolean"):
            a, b = layout.categorical[span.column]
            logits = cat_logit[sel, a:b].astype(np.float64)
            logits -= logits.max(1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(1, keepdims=True)
            vocab = np.array(p["vocab"], dtype=object)
            pick = np.where(vocab == UNK, -1.0, probs).argmax(1)
            expected = pa.array(vocab[pick]).cast(pa.string())
            f.expected_text.append((sel, pc.if_else(pc.equal(expected, NULL), pa.scalar("null"), expected)))
            f.prob[sel] = probs[np.arange(m), pick]
            f.value_text.append((sel, _text(raw, span.kind, m)))
            continue

        k = layout.numeric[span.column]
        if span.kind == "datetime":
            hour = np.mod(np.arctan2(mean[sel, k], mean[sel, k + 1]) / (2 * np.pi) * 24, 24)
            f.hour[sel] = np.floor(hour)
            f.minute[sel] = np.floor((hour - f.hour[sel]) * 60)
            f.value_text.append((sel, _text(raw, "datetime", m)))
            if raw is not None:
                f.value_missing[sel] = raw.is_null().to_numpy(False)
        else:
            mu = mean[sel, k].astype(np.float64)
            sd = np.exp(0.5 * logvar[sel, k].astype(np.float64))
            centre, lo, hi = (_to_original(mu + z * sd, p) for z in (0.0, -Z95, Z95))
            integer = bool(p.get("integer"))
            if integer:
                centre, lo, hi = np.round(centre), np.floor(lo), np.ceil(hi)
            f.centre[sel], f.low[sel], f.high[sel] = centre, lo, hi
            f.digits[sel] = 0 if integer else _digits(hi - lo)
            f.value_decimals[sel] = 0 if integer else 2
            if raw is not None:
                f.value[sel] = pc.cast(raw, pa.float64()).to_numpy(zero_copy_only=False)
                f.value_missing[sel] = ~np.isfinite(f.value[sel])
        if span.column in layout.indicator:
            f.p_missing[sel] = 1.0 / (1.0 + np.exp(-ind_logit[sel, layout.indicator[span.column]].astype(np.float64)))
    return f


def _place(n: int, parts: Sequence[tuple[np.ndarray, pa.Array]]) -> pa.Array:
    """One string array of length n from (positions, strings) parts at disjoint positions;
    null where no part has a string."""
    index = np.full(n, -1, dtype=np.int64)
    arrays, off = [pa.array([], type=pa.string())], 0
    for pos, arr in parts:
        if len(pos):
            index[pos] = off + np.arange(len(pos))
            arrays.append(arr.cast(pa.string()))
            off += len(pos)
    return pa.concat_arrays(arrays).take(pa.array(index, mask=index < 0))


def _to_original(t_std: np.ndarray, p: dict) -> np.ndarray:
    """Standardised decoder units -> original units, clipped to the training range. (m,) -> (m,)"""
    x = _inverse_transform(t_std * p["std"] + p["mean"], p)
    if "min" in p:
        x = np.clip(x, p["min"], p["max"])
    return x


def _digits(width: np.ndarray) -> np.ndarray:
    """Decimals to show for an interval of this width: 0 from 10 up, 1 from 1, else 2. (m,)"""
    w = np.nan_to_num(np.abs(width), nan=0.0)
    return np.where(w >= 10, 0, np.where(w >= 1, 1, 2))


def _fmt(x: np.ndarray, decimals) -> pa.Array:
    """Numbers -> text with thousands separators and `decimals` (int or (m,) ints in 0..3)
    decimals, e.g. 4812.0 -> '4,812.00'; non-finite -> 'nan' / 'inf'. Vectorised."""
    x = np.asarray(x, dtype=np.float64)
    dec = np.broadcast_to(np.asarray(decimals, dtype=np.int64), x.shape)
    kinds = np.unique(dec)
    if len(kinds) <= 1:
        return _fmt_fixed(x, int(kinds[0]) if len(kinds) else 0)
    at = [np.flatnonzero(dec == d) for d in kinds]        # each number formatted once, with its decimals
    return in_order([_fmt_fixed(x[i], int(d)) for i, d in zip(at, kinds)], at)


def _fmt_fixed(x: np.ndarray, d: int) -> pa.Array:
    finite = np.isfinite(x) & (np.abs(x) < 1e15)
    safe = np.where(finite, x, 0.0)
    scaled = np.round(np.abs(safe) * 10 ** d).astype(np.int64)
    whole, frac = np.divmod(scaled, 10 ** d)
    if len(x) <= SMALL:                 # the same digits, joined in Python: fewer calls
        neg = ((safe < 0) & (scaled > 0)).tolist()
        tail = [f".{f:0{d}d}" for f in frac.tolist()] if d else [""] * len(x)
        out = [("-" if n else "") + f"{w:,}" + t for w, t, n in zip(whole.tolist(), tail, neg)]
        odd = np.flatnonzero(~finite)
        if len(odd):
            for i, text in zip(odd.tolist(), pa.array(x[odd]).cast(pa.string()).to_pylist()):
                out[i] = text
        return pa.array(out, type=pa.string())
    n_groups = np.maximum(1, np.floor(np.log10(np.maximum(whole, 1))).astype(np.int64) // 3 + 1)
    text = pa.array(np.full(len(x), "", dtype=object), type=pa.string())
    for g in range(int(n_groups.max(initial=1)) - 1, -1, -1):
        group = pa.array((whole // 10 ** (3 * g)) % 1000).cast(pa.string())
        padded = pc.utf8_lpad(group, 3, padding="0")
        top = pa.array(n_groups == g + 1)
        below = pa.array(n_groups > g + 1)
        text = pc.if_else(top, group, pc.if_else(below, pc.binary_join_element_wise(text, padded, ","), text))
    if d:
        text = pc.binary_join_element_wise(text, pc.utf8_lpad(pa.array(frac).cast(pa.string()), d,
                                                              padding="0"), ".")
    text = pc.if_else(pa.array((safe < 0) & (scaled > 0)), pc.binary_join_element_wise("-", text, ""), text)
    return pc.if_else(pa.array(finite), text, pa.array(x).cast(pa.string()))


def _pad2(v: np.ndarray) -> pa.Array:
    return pc.utf8_lpad(pa.array(v).cast(pa.string()), 2, padding="0")


def _join(parts: list) -> pa.Array:
    """Element-wise concatenation of string arrays and literal strings (null if any part is)."""
    n = next((len(p) for p in parts if not isinstance(p, str)), None)
    if n is not None and n <= SMALL:
        cols = [[p] * n if isinstance(p, str) else p.cast(pa.string()).to_pylist() for p in parts]
        return pa.array([None if None in row else "".join(row) for row in zip(*cols)], type=pa.string())
    arrays = [pa.scalar(p, pa.string()) if isinstance(p, str) else p.cast(pa.string()) for p in parts]
    return pc.binary_join_element_wise(*arrays, "")


def _text(raw: pa.Array | None, kind: str, m: int) -> pa.Array:
    """Row values as text: categories as they are, booleans true/false, timestamps to the
    minute; null -> 'null'."""
    if raw is None:
        return pa.nulls(m, pa.string())
    if kind == "datetime":
        if not pa.types.is_timestamp(raw.type):
            raw = pc.cast(raw, pa.timestamp("ns"))
        text = pc.strftime(raw, format="%Y-%m-%d %H:%M")
    elif pa.types.is_floating(raw.type):          # integer categories read as float: 4.0 -> 4
        whole = pc.equal(raw, pc.floor(raw))
        text = pc.if_else(whole, pc.cast(pc.cast(raw, pa.int64(), safe=False), pa.string()), pc.cast(raw, pa.string()))
    else:
        text = pc.cast(raw, pa.string())
    return pc.fill_null(text, "null")
