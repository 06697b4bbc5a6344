"""anomaly_vae.batch: streaming score_file / score_files, outputs, manifest, resume, encode_files."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from anomaly_vae import batch, io
from anomaly_vae.errors import AnomalyVAEError, DataError, LockedError, SchemaMismatchError


SCORE_COLS = ["anomaly_score", "recon_nll", "kl", "p_value", "is_anomaly", "top_features", "explanation"]


def _leftovers(d: Path) -> list[str]:
    """Temporary files (hidden .tmp- names) left in a directory."""
    return sorted(p.name for p in d.iterdir() if ".tmp-" in p.name) if d.exists() else []


def _assert_matches_explain(det, out: pd.DataFrame, rows: pd.DataFrame) -> None:
    ref = det.explain(rows)
    assert len(out) == len(ref)
    for c in ("anomaly_score", "recon_nll", "kl"):
        np.testing.assert_allclose(out[c].to_numpy(), ref[c].to_numpy(), rtol=1e-5, atol=1e-4)
    # p-values move by at most one calibration rank when a score sits on a calibration score
    n_cal = len(det.calibration_scores_)
    np.testing.assert_allclose(out["p_value"].to_numpy(), ref["p_value"].to_numpy(), atol=1.01 / (n_cal + 1))
    assert (out["is_anomaly"].to_numpy() == ref["is_anomaly"].to_numpy()).mean() > 0.99
    assert (out["top_features"].to_numpy() == ref["top_features"].to_numpy()).mean() > 0.98


@pytest.fixture(scope="module")
def scored_rows():
    """Rows the model did not see in training (different seed), to avoid exact calibration ties."""
    from conftest import mixed_frame
    return mixed_frame(n=700, seed=7)


def test_output_paths_mirror_the_path_below_each_root(tmp_path):
    out = tmp_path / "out"
    flat = [tmp_path / "in" / "a.parquet", tmp_path / "in" / "b.csv"]
    assert batch.output_paths(flat, out) == [out / "a.scored.parquet", out / "b.scored.parquet"]
    hive = [tmp_path / "h" / "dt=2026-01-01" / "part-0.parquet", tmp_path / "h" / "dt=2026-01-02" / "part-0.parquet"]
    expected = [out / "dt=2026-01-01" / "part-0.scored.parquet", out / "dt=2026-01-02" / "part-0.scored.parquet"]
    assert batch.output_paths(hive, out, [tmp_path / "h"] * 2) == expected
    # one day alone still goes to its sub-folder: the path does not depend on the other inputs
    assert batch.output_paths(hive[1:], out, [tmp_path / "h"]) == expected[1:]
    with pytest.raises(DataError, match=r"a\.parquet.*a\.csv.*would all be written to"):
        batch.output_paths([tmp_path / "a.parquet", tmp_path / "a.csv", tmp_path / "x" / "a.pq"], out)
    with pytest.raises(DataError, match="would all be written to"):
        batch.output_paths(hive, out)                               # named directly: flat, clash


def test_resume_never_overwrites_an_output_of_another_input(tmp_path, fitted, scored_rows):
    land, out = tmp_path / "land", tmp_path / "out"
    day1 = land / "dt=2026-01-01" / "part-0.parquet"
    day1.parent.mkdir(parents=True)
    scored_rows.iloc[:50].to_parquet(day1, index=False)
    pairs = io.expand_inputs_with_roots([land])
    batch.score_files(fitted, [f for f, _ in pairs], out, resume=True, roots=[r for _, r in pairs])
    first = out / "dt=2026-01-01" / "part-0.scored.parquet"
    before = first.read_bytes()
    day1.unlink()                                                   # next night: only day 3 lands
    day3 = land / "dt=2026-01-03" / "part-0.parquet"
    day3.parent.mkdir()
    scored_rows.iloc[50:80].to_parquet(day3, index=False)
    pairs = io.expand_inputs_with_roots([land])
    batch.score_files(fitted, [f for f, _ in pairs], out, resume=True, roots=[r for _, r in pairs])
    assert first.read_bytes() == before
    assert len(pd.read_parquet(out / "dt=2026-01-03" / "part-0.scored.parquet")) == 30
    # a different input that would land on a finished output is refused before anything is written
    other = tmp_path / "elsewhere" / "dt=2026-01-01" / "part-0.parquet"
    other.parent.mkdir(parents=True)
    scored_rows.iloc[:10].to_parquet(other, index=False)
    with pytest.raises(DataError, match=r"already holds the scores of .*land/dt=2026-01-01.*another --output"):
        batch.score_files(fitted, [other, day3], out, resume=True, roots=[tmp_path / "elsewhere", land])
    assert first.read_bytes() == before


def test_score_files_nested_outputs_resume_and_stale_temps(tmp_path, fitted, scored_rows):
    hive = tmp_path / "hive"
    for i, day in enumerate(("2026-01-01", "2026-01-02")):
        (hive / f"dt={day}").mkdir(parents=True)
        scored_rows.iloc[i * 100:(i + 1) * 100].to_parquet(hive / f"dt={day}" / "part-0.parquet", index=False)
    out = tmp_path / "out"
    inputs = io.expand_inputs([hive])
    res = batch.score_files(fitted, inputs, out, batch_size=64, roots=[hive] * len(inputs))
    assert res["summary"]["scored"] == 2
    first = out / "dt=2026-01-01" / "part-0.scored.parquet"
    got = pd.read_parquet(first)
    assert got["row_id"].tolist() == scored_rows["row_id"].iloc[:100].tolist()
    entry = batch.read_manifest(out)["files"][str(inputs[0].resolve())]
    assert entry["output"] == str(first) and entry["status"] == "done"
    # a killed run left a temporary in a subfolder; --resume removes it and skips finished files
    (out / "dt=2026-01-02" / ".part-0.scored.parquet.tmp-0badc0de").write_bytes(b"half")
    mtime = first.stat().st_mtime_ns
    pairs = io.expand_inputs_with_roots([str(hive / "dt=*" / "*.parquet")])
    res = batch.score_files(fitted, [f for f, _ in pairs], out, resume=True, roots=[r for _, r in pairs])
    assert (res["summary"]["scored"], res["summary"]["skipped"]) == (0, 2)
    assert first.stat().st_mtime_ns == mtime and _leftovers(out / "dt=2026-01-02") == []


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_duplicate_column_names_name_file_and_column(tmp_path, fitted, scored_rows, suffix):
    table = pa.Table.from_pandas(scored_rows.head(20), preserve_index=False)
    table = table.append_column("amount", table.column("amount"))      # a second 'amount'
    src = tmp_path / f"dup{suffix}"
    if suffix == ".csv":
        import pyarrow.csv as pacsv
        pacsv.write_csv(table, src)
    else:
        pq.write_table(table, src)
    pattern = rf"dup\{suffix}: duplicate column name\(s\) \['amount'\]"
    with pytest.raises(DataError, match=pattern):
        io.input_schema(src)
    with pytest.raises(DataError, match=pattern):
        io.read_table(src)
    with pytest.raises(DataError, match=pattern):
        batch.score_file(fitted, src, tmp_path / "o" / "dup.scored.parquet")
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []


@pytest.mark.parametrize("keep", ["ids", "all"])
def test_missing_id_column_is_a_warning(tmp_path, fitted, scored_rows, caplog, keep):
    scored_rows.head(50).drop(columns=["row_id"]).to_parquet(tmp_path / "noid.parquet", index=False)
    res = batch.score_files(fitted, [tmp_path / "noid.parquet"], tmp_path / "out", keep=keep)
    assert res["summary"]["rows"] == 50
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("noid.parquet" in w and "'row_id'" in w and "no key column" in w for w in warned), warned
    entry = batch.read_manifest(tmp_path / "out")["files"][str((tmp_path / "noid.parquet").resolve())]
    assert any("'row_id'" in w for w in entry["warnings"])


def test_empty_inputs_warn_and_keep_the_output_schema(tmp_path, fitted, scored_rows, caplog):
    rows = scored_rows.head(30)
    rows.to_csv(tmp_path / "full.csv", index=False)
    rows.head(0).to_csv(tmp_path / "empty.csv", index=False)             # header only
    rows.head(0).to_parquet(tmp_path / "empty0.parquet", index=False)
    res = batch.score_files(fitted, [tmp_path / "full.csv", tmp_path / "empty.csv", tmp_path / "empty0.parquet"],
                         tmp_path / "out")
    assert res["summary"]["rows"] == 30
    full = pq.read_schema(tmp_path / "out" / "full.scored.parquet")
    empty = pq.read_table(tmp_path / "out" / "empty.scored.parquet")
    assert empty.num_rows == 0 and empty.schema == full                  # row_id: string, not null/object
    assert pa.types.is_string(empty.schema.field("row_id").type)
    assert pq.read_table(tmp_path / "out" / "empty0.scored.parquet").schema.names == ["row_id"] + SCORE_COLS
    warned = " | ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "empty.csv: no rows" in warned and "empty0.parquet: no rows" in warned
    assert "full.csv" not in warned


def test_score_file_matches_explain_and_streams(tmp_path, fitted, scored_rows):
    src = tmp_path / "rows.parquet"
    scored_rows.to_parquet(src, index=False)
    seen = []
    stats = batch.score_file(fitted, src, tmp_path / "out" / "rows.scored.parquet", batch_size=128,
                          progress=seen.append)
    out_path = tmp_path / "out" / "rows.scored.parquet"
    assert stats["rows_in"] == stats["rows_out"] == len(scored_rows) and stats["status"] == "done"
    assert sum(seen) == len(scored_rows) and max(seen) <= 128
    pf = pq.ParquetFile(out_path)
    assert pf.metadata.num_row_groups == int(np.ceil(len(scored_rows) / 128))   # one per batch: streamed
    out = pf.read().to_pandas()
    assert list(out.columns) == ["row_id"] + SCORE_COLS            # ids pass through by default
    assert out["row_id"].tolist() == scored_rows["row_id"].tolist()
    assert stats["flagged"] == int(out["is_anomaly"].sum())
    assert pf.schema_arrow.field("is_anomaly").type == pa.bool_()
    _assert_matches_explain(fitted, out, scored_rows)
    assert _leftovers(tmp_path / "out") == []


def test_score_file_keep_all_csv_and_empty(tmp_path, fitted, scored_rows):
    rows = scored_rows.head(200).assign(extra=np.arange(200), anomaly_score=-1.0)   # a clashing column
    rows.to_parquet(tmp_path / "r.parquet", index=False)
    batch.score_file(fitted, tmp_path / "r.parquet", tmp_path / "r.out.parquet", keep="all", batch_size=64)
    out = pd.read_parquet(tmp_path / "r.out.parquet")
    expected = [c for c in rows.columns if c != "anomaly_score"] + SCORE_COLS
    assert list(out.columns) == expected
    assert (out["extra"].to_numpy() == np.arange(200)).all() and (out["anomaly_score"] > 0).all()

    rows.drop(columns=["anomaly_score"]).to_csv(tmp_path / "r.csv", index=False)
    batch.score_file(fitted, tmp_path / "r.csv", tmp_path / "c.out.parquet", batch_size=64)
    csv_out = pd.read_parquet(tmp_path / "c.out.parquet")
    np.testing.assert_allclose(csv_out["anomaly_score"], out["anomaly_score"], rtol=1e-5)

    rows.head(0).to_parquet(tmp_path / "empty.parquet", index=False)
    stats = batch.score_file(fitted, tmp_path / "empty.parquet", tmp_path / "e.out.parquet")
    assert stats["rows_out"] == 0
    empty = pq.read_table(tmp_path / "e.out.parquet")
    assert empty.num_rows == 0 and empty.schema.names == ["row_id"] + SCORE_COLS
    with pytest.raises(DataError, match="keep must be"):
        batch.score_file(fitted, tmp_path / "r.parquet", tmp_path / "x.parquet", keep="some")


def test_score_file_bad_value_midstream_leaves_old_output(tmp_path, fitted, scored_rows):
    bad = scored_rows.head(400).copy()
    bad["amount"] = bad["amount"].astype(str)
    bad.loc[350, "amount"] = "twelve"                  # in the 3rd batch: two batches already written
    bad.to_parquet(tmp_path / "bad.parquet", index=False)
    dst = tmp_path / "out" / "bad.scored.parquet"
    dst.parent.mkdir()
    dst.write_bytes(b"previous complete output")
    with pytest.raises(SchemaMismatchError) as err:
        batch.score_file(fitted, tmp_path / "bad.parquet", dst, batch_size=150)
    msg = str(err.value)
    assert "bad.parquet" in msg and "'amount'" in msg and "twelve" in msg and "\n" not in msg
    assert dst.read_bytes() == b"previous complete output"           # untouched
    assert _leftovers(dst.parent) == []


def test_score_file_missing_column_and_corrupt(tmp_path, fitted, scored_rows):
    scored_rows.drop(columns=["cat"]).to_parquet(tmp_path / "nocat.parquet", index=False)
    with pytest.raises(SchemaMismatchError, match=r"nocat\.parquet: missing required column\(s\) \['cat'\]"):
        batch.score_file(fitted, tmp_path / "nocat.parquet", tmp_path / "o" / "nocat.parquet")
    good = tmp_path / "good.parquet"
    scored_rows.to_parquet(good, index=False, row_group_size=100)
    raw = bytearray(good.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 2000] = os.urandom(2000)                 # footer intact, data pages garbled
    (tmp_path / "corrupt.parquet").write_bytes(bytes(raw))
    with pytest.raises(AnomalyVAEError, match=r"corrupt\.parquet"):
        batch.score_file(fitted, tmp_path / "corrupt.parquet", tmp_path / "o" / "corrupt.parquet", batch_size=50)
    assert not (tmp_path / "o").exists() or sorted(os.listdir(tmp_path / "o")) == []


def test_score_files_manifest_and_resume(tmp_path, fitted, scored_rows):
    ind = tmp_path / "in"
    ind.mkdir()
    for i in range(3):
        scored_rows.iloc[i * 200:(i + 1) * 200].to_parquet(ind / f"part-{i}.parquet", index=False)
    out = tmp_path / "out"
    inputs = io.expand_inputs([ind])
    info = {"uri": "models:/m/1", "name": "m", "version": 1, "run_id": "r"}
    res = batch.score_files(fitted, inputs, out, model_info=info, batch_size=64)
    assert res["summary"] == {**res["summary"], "files": 3, "scored": 3, "skipped": 0, "rows": 600}
    man = json.loads((out / batch.MANIFEST).read_text())
    assert man["model"] == {**info, "sha256": batch.model_digest(fitted)} and man["format"] == batch.MANIFEST_FORMAT
    assert {e["status"] for e in man["files"].values()} == {"done"}
    assert sum(e["rows_out"] for e in man["files"].values()) == 600

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.scored.parquet")}
    # an input that changed since it was scored is not "done" any more
    key = str((ind / "part-2.parquet").resolve())
    assert batch.is_done(man["files"][key], ind / "part-2.parquet")
    scored_rows.iloc[400:450].to_parquet(ind / "part-2.parquet", index=False)
    assert not batch.is_done(man["files"][key], ind / "part-2.parquet")
    res = batch.score_files(fitted, inputs, out, model_info=info, resume=True)
    assert (res["summary"]["scored"], res["summary"]["skipped"]) == (1, 2)
    assert pq.read_metadata(out / "part-2.scored.parquet").num_rows == 50
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-[01].scored.parquet")} == \
        {k: v for k, v in mtimes.items() if k != "part-2.scored.parquet"}

    # the model is identified by content: the same model under another URI resumes ...
    other = {**info, "uri": "models:/m@champion", "version": None}
    assert batch.score_files(fitted, inputs, out, model_info=other, resume=True)["summary"]["skipped"] == 3
    # ... another model (here: another threshold) under the same URI is refused
    changed = copy.deepcopy(fitted)
    changed.threshold_ += 1.0
    with pytest.raises(DataError, match=r"written by another model \(models:/m@champion, sha256 .*the model "
                                        r"changed since that run.*drop --resume"):
        batch.score_files(changed, inputs, out, model_info=info, resume=True)
    # same base name in two folders: given through their common folder, outputs keep the folders
    (tmp_path / "again").mkdir()
    scored_rows.head(5).to_parquet(tmp_path / "again" / "part-0.parquet", index=False)
    both = inputs + [tmp_path / "again" / "part-0.parquet"]
    res = batch.score_files(fitted, both, tmp_path / "both", roots=[tmp_path] * len(both))
    assert res["summary"]["scored"] == 4
    assert pq.read_metadata(tmp_path / "both" / "again" / "part-0.scored.parquet").num_rows == 5
    assert pq.read_metadata(tmp_path / "both" / "in" / "part-0.scored.parquet").num_rows == 200


@pytest.mark.parametrize("share, writes", [(1.0, 1 + 2 * 12), (1e-12, 2)])
def test_many_inputs_bound_the_time_spent_rewriting_the_manifest(tmp_path, fitted, scored_rows, monkeypatch,
                                                                 share, writes):
    """A whole-manifest rewrite per input made many small inputs quadratic: the rewrites after
    each input are skipped when they would take more than MANIFEST_SHARE of the run's time
    (share 1: every one, as for inputs that take longer than a rewrite; a tiny share: only
    the first and the last), and the run ends with the complete manifest."""
    ind = tmp_path / "in"
    ind.mkdir()
    for i in range(12):
        scored_rows.iloc[i * 10:(i + 1) * 10].to_parquet(ind / f"part-{i:02d}.parquet", index=False)
    seen = []
    real = batch.write_manifest
    monkeypatch.setattr(batch, "write_manifest",
                        lambda d, m: seen.append({k: e["status"] for k, e in m["files"].items()}) or real(d, m))
    monkeypatch.setattr(batch, "MANIFEST_SHARE", share)
    out = tmp_path / "out"
    res = batch.score_files(fitted, io.expand_inputs([ind]), out)
    assert res["summary"]["scored"] == 12 and (out / batch.SUCCESS).exists()
    assert len(seen) == writes
    assert seen[-1] == {str((ind / f"part-{i:02d}.parquet").resolve()): "done" for i in range(12)}
    assert batch.read_manifest(out)["files"].keys() == seen[-1].keys()
    # a failure is written at once, whatever the spacing
    (ind / "part-05.parquet").write_bytes(b"not parquet")
    seen.clear()
    res = batch.score_files(fitted, io.expand_inputs([ind]), tmp_path / "out2", keep_going=True)
    assert res["summary"]["failed"] == 1
    failed = [i for i, m in enumerate(seen) if "failed" in m.values()]
    assert failed and (share == 1.0 or failed[0] == 1)    # a tiny share: the write right after the first
    assert batch.read_manifest(tmp_path / "out2")["files"][str((ind / "part-05.parquet").resolve())]["status"] == "failed"


def test_manifest_unreadable_and_atomic(tmp_path):
    assert batch.read_manifest(tmp_path) is None
    batch.write_manifest(tmp_path, {"format": batch.MANIFEST_FORMAT, "files": {}})
    assert batch.read_manifest(tmp_path)["format"] == batch.MANIFEST_FORMAT
    assert _leftovers(tmp_path) == []
    (tmp_path / batch.MANIFEST).write_text("{ truncated")
    with pytest.raises(DataError, match="unreadable manifest"):
        batch.read_manifest(tmp_path)


def test_encode_files_and_write_frame(tmp_path, fitted, scored_rows):
    scored_rows.head(300).to_parquet(tmp_path / "a.parquet", index=False)
    scored_rows.iloc[300:400].to_parquet(tmp_path / "b.parquet", index=False)
    n = batch.encode_files(fitted, [tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "z.parquet",
                        batch_size=128)
    z = pd.read_parquet(tmp_path / "z.parquet")
    k = fitted.config_.latent_dim
    assert n == 400 and list(z.columns) == ["row_id"] + [f"z{j}" for j in range(k)]
    ref = fitted.encode(scored_rows.head(400))
    np.testing.assert_allclose(z[[f"z{j}" for j in range(k)]].to_numpy(), ref, rtol=1e-4, atol=1e-5)
    io.write_frame(pd.DataFrame({"a": [1, 2]}), tmp_path / "w.csv")
    assert (tmp_path / "w.csv").read_text().splitlines() == ["a", "1", "2"]


def test_csv_bad_value_names_file_and_column(tmp_path, fitted, scored_rows):
    rows = scored_rows.head(300).copy()
    rows["x"] = rows["x"].astype(object)
    rows.loc[290, "x"] = "not-a-number"
    rows.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(AnomalyVAEError) as err:
        batch.score_file(fitted, tmp_path / "bad.csv", tmp_path / "o" / "bad.parquet", batch_size=50)
    assert "bad.csv" in str(err.value) and "'x'" in str(err.value)
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []


def test_score_batch_is_a_pure_function_of_the_rows(fitted, scored_rows):
    """score_batch (the unit the CLI loop, pyfunc and Spark share) matches explain(), keeps the
    pass-through columns, ignores extra columns, and does not depend on how rows are batched."""
    rb = pa.RecordBatch.from_pandas(scored_rows.assign(extra=1.0), preserve_index=False)
    ids = [c for c in fitted.schema_.ids if c in scored_rows.columns][:1] or ["extra"]
    out = batch.score_batch(fitted, rb, ids)
    assert out.schema == batch.output_schema(rb.schema, ids)
    assert out.schema.names == ids + SCORE_COLS and out.num_rows == len(scored_rows)
    assert out.column(0).equals(rb.column(ids[0]))
    _assert_matches_explain(fitted, out.to_pandas(), scored_rows)
    # the same bits however the rows are cut (blocks padded to whole vector lanes: model.pad_rows)
    for cuts in ([300], [1, 2, 130, 301, 555], list(range(7, 700, 7))):
        parts = [batch.score_batch(fitted, rb.slice(a, b - a), ids) for a, b in zip([0, *cuts], [*cuts, 700])]
        assert pa.Table.from_batches(parts).equals(pa.Table.from_batches([out])), cuts
    with pytest.raises(SchemaMismatchError, match="missing required column"):
        batch.score_batch(fitted, rb.drop_columns([fitted.schema_.features[0].name]))


def test_parallel_workers_write_the_same_bytes_as_one(tmp_path, fitted, scored_rows):
    src = tmp_path / "rows.parquet"
    scored_rows.to_parquet(src, index=False)
    outs = []
    for workers in (1, 3):
        dst = tmp_path / f"w{workers}" / "rows.scored.parquet"
        stats = batch.score_file(fitted, src, dst, batch_size=64, workers=workers)
        assert stats["rows_out"] == len(scored_rows)
        outs.append(pq.read_table(dst))
    assert outs[0].equals(outs[1])               # same rows, order, scores and explanations


def test_batch_scored_in_slices_equals_one_slice(tmp_path, fitted, scored_rows, monkeypatch):
    """A batch larger than ENCODE_ROWS is encoded and run through the network slice by slice,
    its explanations made once from the flagged rows kept: the output equals score_batch's."""
    src = tmp_path / "rows.parquet"
    scored_rows.to_parquet(src, index=False)
    whole = batch.score_batch(fitted, pa.RecordBatch.from_pandas(scored_rows, preserve_index=False),
                              ["row_id"])
    assert pc.sum(whole.column("is_anomaly")).as_py() > 0     # some rows explained
    monkeypatch.setattr(batch, "ENCODE_ROWS", 100)           # 7 slices per 700-row batch
    dst = tmp_path / "out" / "rows.scored.parquet"
    batch.score_file(fitted, src, dst, batch_size=700)
    sliced = pq.read_table(dst)
    assert sliced.num_rows == whole.num_rows and sliced.schema == whole.schema
    for c in ("anomaly_score", "recon_nll", "kl", "p_value"):
        np.testing.assert_allclose(sliced.column(c).to_numpy(), whole.column(c).to_numpy(), rtol=1e-6, atol=1e-6)
    for c in ("is_anomaly", "top_features", "explanation", "row_id"):
        assert sliced.column(c).to_pylist() == whole.column(c).to_pylist(), c


def test_score_files_hooks_see_every_batch_once_in_order(tmp_path, fitted, scored_rows):
    """on_start once (under the lock), on_batch with each input batch and its scores before they
    are written, on_input with each input's outcome; a locked-out run calls none of them."""
    ind = tmp_path / "in"
    ind.mkdir()
    for i in range(2):
        scored_rows.iloc[i * 200:(i + 1) * 200].to_parquet(ind / f"part-{i}.parquet", index=False)
    bad = scored_rows.iloc[400:500].copy()
    bad["amount"] = bad["amount"].astype(str)
    bad.loc[bad.index[80], "amount"] = "twelve"
    bad.to_parquet(ind / "part-2.parquet", index=False)
    events = []
    hooks = dict(on_start=lambda: events.append(("start", (tmp_path / "out" / batch.LOCK_FILE).exists())),
                 on_batch=lambda src, b, s: events.append(("batch", Path(src).name, b.num_rows, s.num_rows,
                                                           b.column("row_id").equals(s.column("row_id")),
                                                           b.column("row_id").to_pylist())),
                 on_input=lambda src, status: events.append(("input", Path(src).name, status)))
    inputs = io.expand_inputs([ind])
    res = batch.score_files(fitted, inputs, tmp_path / "out", batch_size=64, keep_going=True, workers=3, **hooks)
    assert res["summary"]["failed"] == 1
    assert events[0] == ("start", True) and [e[0] for e in events].count("start") == 1
    for name, rows in (("part-0.parquet", 200), ("part-1.parquet", 200)):
        seen = [e for e in events if e[0] == "batch" and e[1] == name]
        assert sum(e[2] for e in seen) == rows and all(e[2] == e[3] and e[4] for e in seen)
        assert [i for e in seen for i in e[5]] == list(pd.read_parquet(ind / name)["row_id"])   # in order
    # the failing input: at most the batches before the bad one (with 3 workers maybe none)
    assert sum(e[2] for e in events if e[0] == "batch" and e[1] == "part-2.parquet") < 100
    assert [e[1:] for e in events if e[0] == "input"] == [
        ("part-0.parquet", "done"), ("part-1.parquet", "done"), ("part-2.parquet", "failed")]
    events.clear()
    batch.score_files(fitted, inputs[:2], tmp_path / "out", resume=True, **hooks)
    assert events == [("start", True), ("input", "part-0.parquet", "skipped"), ("input", "part-1.parquet", "skipped")]
    events.clear()
    with batch.output_lock(tmp_path / "out"):
        with pytest.raises(LockedError):
            batch.score_files(fitted, inputs, tmp_path / "out", **hooks)
    assert events == []


def test_string_categoricals_are_read_as_dictionaries_with_the_same_scores(tmp_path, fitted, scored_rows):
    """score_file reads the model's string categoricals as dictionary arrays; the output and the
    run statistics are those of plain string batches, byte for byte."""
    from anomaly_vae.monitor import ScoringMonitor

    src = tmp_path / "rows.parquet"
    rows = scored_rows.copy()
    rows.loc[rows.index[::17], "cat"] = None                 # nulls in a dictionary column too
    rows.to_parquet(src, index=False)
    cats = [c.name for c in fitted.schema_.features if c.kind == "categorical"]
    assert cats and pa.types.is_large_string(pq.read_schema(src).field(cats[0]).type)
    first = next(io.iter_batches(src, 64, dictionary=cats))
    assert all(pa.types.is_dictionary(first.schema.field(c).type) for c in cats)

    def monitor():
        return ScoringMonitor(fitted.reference_, fitted.calibration_scores_, fitted.schema_,
                              fitted.threshold_, passthrough=["row_id"])
    streamed, plain = monitor(), monitor()
    batch.score_file(fitted, src, tmp_path / "out.parquet", batch_size=200,
                     on_batch=lambda b, s: streamed.update(b, s, "rows"))
    out = pq.read_table(tmp_path / "out.parquet")
    expected = []
    for b in pq.read_table(src).to_batches(max_chunksize=200):
        scored = batch.score_batch(fitted, b, ["row_id"])
        plain.update(b, scored, "rows")
        expected.append(scored)
    assert out.equals(pa.Table.from_batches(expected).cast(out.schema))
    assert {k: v.values for k, v in streamed.features.items() if v.kind == "categorical"} == \
        {k: v.values for k, v in plain.features.items() if v.kind == "categorical"}


def _alone(fitted, files, out):
    """Each file scored on its own (score_file): {name: table}."""
    for f in files:
        batch.score_file(fitted, f, out / batch.output_path(f, out).name)
    return {p.name: pq.read_table(p) for p in sorted(out.glob("*.scored.parquet"))}


def test_small_files_are_scored_in_pools_with_the_bits_of_each_file_alone(tmp_path, fitted, scored_rows,
                                                                         monkeypatch):
    """Small inputs (what a stream's sink leaves) are read and scored together, a batch's fixed
    cost shared; each output, entry and hook call is still the file's own, with the same bits
    as the file scored alone. A file of another schema starts a new pool; a file changed after
    its pool read it is read and scored again; a bad file fails alone."""
    ind = tmp_path / "in"
    ind.mkdir()
    rows = scored_rows.assign(amount=scored_rows["amount"].astype(str))    # cast when scored
    for i in range(14):
        rows.iloc[i * 50:(i + 1) * 50].to_parquet(ind / f"part-{i:02d}.parquet", index=False)
    rows.iloc[:30].assign(extra=1.5).to_parquet(ind / "part-05.parquet", index=False)  # another schema
    bad = rows.iloc[100:150].copy()
    bad.loc[bad.index[7], "amount"] = "twelve"                              # same schema, bad value
    bad.to_parquet(ind / "part-02.parquet", index=False)
    inputs = io.expand_inputs([ind])
    calls = []
    sliced = batch._score_sliced
    monkeypatch.setattr(batch, "_score_sliced", lambda *a, **k: calls.append(a[1].num_rows) or sliced(*a, **k))
    changed = rows.iloc[600:640]

    def on_input(src, status):                   # part-12 changes after its pool has read it
        events.append((Path(src).name, status))
        if Path(src).name == "part-10.parquet":
            changed.to_parquet(ind / "part-12.parquet", index=False)
    events, batches = [], {}
    res = batch.score_files(fitted, inputs, tmp_path / "out", keep_going=True, on_input=on_input,
                            on_batch=lambda src, b, s: batches.setdefault(Path(src).name, []).append(
                                (b.column("row_id").to_pylist(), s.column("row_id").to_pylist())))
    assert res["summary"]["scored"] == 13 and res["summary"]["failed"] == 1
    failure = res["summary"]["failures"][0]
    assert "part-02.parquet (rows 0-49)" in failure and "'amount'" in failure and "twelve" in failure
    assert events == [(f"part-{i:02d}.parquet", "failed" if i == 2 else "done") for i in range(14)]
    # the pool 00-04 fails (02), so its files are scored one by one; 05 (its own schema) alone;
    # the pool 06-13, then 12 alone (changed)
    assert calls == [250, 50, 50, 50, 50, 50, 30, 400, 40], calls
    for name, seen in batches.items():
        ids = pd.read_parquet(ind / name)["row_id"].tolist()
        if name != "part-02.parquet":
            assert seen == [(ids, ids)], name     # one call, the file's own rows in order
    monkeypatch.setattr(batch, "_score_sliced", sliced)
    got = {p.name: pq.read_table(p) for p in sorted((tmp_path / "out").glob("*.scored.parquet"))}
    alone = _alone(fitted, [f for f in inputs if Path(f).name != "part-02.parquet"], tmp_path / "alone")
    assert sorted(got) == sorted(alone) and len(got) == 13
    for name, table in alone.items():
        assert got[name].equals(table), name
    assert got["part-12.scored.parquet"].column("row_id").to_pylist() == changed["row_id"].tolist()
    files = res["files"]
    assert [files[io.canonical(f)]["rows_out"] for f in inputs if Path(f).name != "part-02.parquet"] == \
        [got[batch.output_path(f, tmp_path).name].num_rows for f in inputs if Path(f).name != "part-02.parquet"]


def test_pooled_run_resumed_skips_the_done_inputs_and_pools_the_rest(tmp_path, fitted, scored_rows):
    ind = tmp_path / "in"
    ind.mkdir()
    for i in range(7):
        scored_rows.iloc[i * 100:(i + 1) * 100].to_parquet(ind / f"p{i}.parquet", index=False)
    inputs = io.expand_inputs([ind])
    out = tmp_path / "out"
    batch.score_files(fitted, [inputs[1], inputs[4]], out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.scored.parquet")}
    res = batch.score_files(fitted, inputs, out, resume=True)
    assert res["summary"]["skipped"] == 2 and res["summary"]["scored"] == 5
    assert {n: (out / n).stat().st_mtime_ns for n in before} == before
    alone = _alone(fitted, inputs, tmp_path / "alone")
    assert all(pq.read_table(out / n).equals(t) for n, t in alone.items())


def test_rerun_over_many_done_inputs_is_linear_in_their_number(tmp_path, fitted, scored_rows, monkeypatch):
    """Checking that no input is written over another's output compared every input with every
    manifest entry: a --resume of 1,000 done files took 29 s doing nothing. The entries are
    now indexed by output once, so the path look-ups grow with the number of inputs."""
    n = 60
    ind = tmp_path / "in"
    ind.mkdir()
    for i in range(n):
        scored_rows.iloc[i * 10:(i + 1) * 10].to_parquet(ind / f"part-{i:03d}.parquet", index=False)
    out = tmp_path / "out"
    inputs = io.expand_inputs([ind])
    assert batch.score_files(fitted, inputs, out)["summary"]["scored"] == n
    calls = []
    real = io.canonical
    monkeypatch.setattr(io, "canonical", lambda p: calls.append(p) or real(p))
    assert batch.score_files(fitted, inputs, out, resume=True)["summary"]["skipped"] == n
    assert 0 < len(calls) <= 12 * n             # was 2 n (n - 1) + ... = 7,000+ for 60 inputs
    calls.clear()
    assert batch.score_files(fitted, inputs, out)["summary"]["scored"] == n      # without --resume
    assert 0 < len(calls) <= 12 * n
    assert {e["status"] for e in batch.read_manifest(out)["files"].values()} == {"done"}
