"""anomaly_vae.io: input expansion, whole-file reads, record-batch streams."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anomaly_vae import io
from anomaly_vae.errors import DataError


def test_expand_inputs_files_dirs_globs(tmp_path, frame):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("b.parquet", "a.parquet", "c.csv"):
        (d / name).write_bytes(b"x")
    (d / "_manifest.json").write_text("{}")
    (d / ".a.parquet.tmp-1234").write_bytes(b"x")
    (d / "notes.txt").write_text("x")
    (d / "_skip.parquet").write_bytes(b"x")
    assert [p.name for p in io.expand_inputs([d])] == ["a.parquet", "b.parquet", "c.csv"]
    assert [p.name for p in io.expand_inputs([str(d / "*.parquet")])] == ["a.parquet", "b.parquet"]
    # explicit file + the dir that holds it: no duplicates, order kept
    assert [p.name for p in io.expand_inputs([d / "b.parquet", d])] == ["b.parquet", "a.parquet", "c.csv"]
    with pytest.raises(DataError, match="nope.parquet: no such file"):
        io.expand_inputs([d / "nope.parquet"])
    with pytest.raises(DataError, match="matches no"):
        io.expand_inputs([str(d / "*.orc")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: directory has no"):
        io.expand_inputs([empty])
    with pytest.raises(DataError):
        io.expand_inputs([])


def test_expand_inputs_searches_directories_recursively(tmp_path):
    """Hive-style layout: data/dt=2026-01-01/part-0.parquet ... is found from data/."""
    d = tmp_path / "data"
    for day in ("2026-01-02", "2026-01-01"):
        (d / f"dt={day}").mkdir(parents=True)
        (d / f"dt={day}" / "part-0.parquet").write_bytes(b"x")
    (d / "top.csv").write_bytes(b"x")
    for skipped in ("_temporary", ".hidden", "scored"):        # scored/: an output dir with a manifest
        (d / skipped).mkdir()
        (d / skipped / "part-9.parquet").write_bytes(b"x")
    (d / "scored" / io.MANIFEST).write_text("{}")
    got = [p.relative_to(d).as_posix() for p in io.expand_inputs([d])]
    assert got == ["dt=2026-01-01/part-0.parquet", "dt=2026-01-02/part-0.parquet", "top.csv"]
    (d / "empty" / "deeper").mkdir(parents=True)
    with pytest.raises(DataError, match="empty: directory has no .* \\(searched recursively\\)"):
        io.expand_inputs([d / "empty"])


def test_read_table_parquet_csv_and_errors(tmp_path, frame):
    small = frame.head(50)
    small.to_parquet(tmp_path / "t.parquet", index=False)
    small.to_csv(tmp_path / "t.csv", index=False)
    back = io.read_table(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(back, small, check_dtype=False)
    csv = io.read_table(tmp_path / "t.csv")
    assert list(csv.columns) == list(small.columns) and len(csv) == 50
    np.testing.assert_allclose(csv["amount"], small["amount"])
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read as parquet"):
        io.read_table(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="missing.parquet: no such file"):
        io.read_table(tmp_path / "missing.parquet")
    with pytest.raises(DataError, match="columns differ"):
        small.drop(columns=["x"]).to_parquet(tmp_path / "u.parquet", index=False)
        io.read_tables([tmp_path / "t.parquet", tmp_path / "u.parquet"])


def test_iter_batches_sizes_and_columns(tmp_path, frame):
    frame.to_parquet(tmp_path / "f.parquet", index=False, row_group_size=400)
    batches = list(io.iter_batches(tmp_path / "f.parquet", batch_size=256, columns=["amount", "cat"]))
    assert max(b.num_rows for b in batches) <= 256
    assert sum(b.num_rows for b in batches) == len(frame)
    assert all(b.schema.names == ["amount", "cat"] for b in batches)
    frame.head(300).to_csv(tmp_path / "f.csv", index=False)
    csv_batches = list(io.iter_batches(tmp_path / "f.csv", batch_size=64))
    assert sum(b.num_rows for b in csv_batches) == 300 and max(b.num_rows for b in csv_batches) <= 64
    with pytest.raises(DataError):
        list(io.iter_batches(tmp_path / "f.parquet", batch_size=0))


def test_iter_batches_reads_every_row_group_in_order(tmp_path, frame):
    import pyarrow as pa

    frame.to_parquet(tmp_path / "g.parquet", index=False, row_group_size=300)
    got = pa.Table.from_batches(list(io.iter_batches(tmp_path / "g.parquet", batch_size=128)))
    assert got.column("row_id").to_pylist() == frame["row_id"].tolist()


def test_prefetch_keeps_order_bounds_memory_and_passes_errors():
    import threading

    produced = []

    def items(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise DataError("bad batch")
            produced.append(i)
            yield i

    assert list(io.prefetch(items(50), depth=2)) == list(range(50))
    produced.clear()
    gen = io.prefetch(items(1000), depth=2)
    assert next(gen) == 0
    gen.close()                                  # stops the producer, which had run ahead a little
    assert len(produced) <= 5
    assert not any(t.name == "anomaly-vae-prefetch" for t in threading.enumerate())
    with pytest.raises(DataError, match="bad batch"):
        list(io.prefetch(items(10, fail_at=4)))


def test_parallel_map_keeps_order_bounds_work_in_flight_and_passes_errors():
    import threading
    import time

    started, active, peak = [], [0], [0]
    lock = threading.Lock()

    def work(i):
        with lock:
            started.append(i)
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.002 * (i % 3))               # finish out of order
        with lock:
            active[0] -= 1
        if i == 7:
            raise DataError("bad batch 7")
        return i * i

    assert list(io.parallel_map(work, range(7), workers=3)) == [i * i for i in range(7)]
    assert peak[0] >= 2                           # really ran side by side
    started.clear()
    gen = io.parallel_map(work, range(1000), workers=2)
    assert next(gen) == 0
    assert len(started) <= 4                      # at most workers + 1 submitted ahead
    gen.close()
    with pytest.raises(DataError, match="bad batch 7"):
        list(io.parallel_map(work, range(20), workers=2))
    assert list(io.parallel_map(work, range(5), workers=1)) == [0, 1, 4, 9, 16]
    assert io.cpu_count() >= 1


def test_sample_rows_is_not_drawn_by_the_stream_that_generated_the_data(tmp_path):
    """Rows made with default_rng(0) (the demo generators) were sampled by the same numbers:
    the wide table's first draws pick each row's segment, so a seed-0 sample kept segment 0
    rows only among the first batch's rows, and the model it trained flagged 1.4% of new rows
    at a 1% target. The keys now come from a stream of their own."""
    u = np.random.default_rng(0).random(20_000)                    # what a generator drew first
    pd.DataFrame({"u": u}).to_parquet(tmp_path / "d.parquet", index=False)
    got, _ = io.sample_rows([tmp_path / "d.parquet"], 1_000, seed=0)
    # a uniform sample of uniform values: its mean is 0.5 (sd ~0.009), not the ~0.025 of the
    # rows with the 1,000 smallest values (which the shared stream would have kept)
    assert abs(got["u"].mean() - 0.5) < 0.05


def test_sample_rows_is_a_deterministic_uniform_sample_in_input_order(tmp_path, frame):
    parts = [frame.iloc[i * 500:(i + 1) * 500] for i in range(3)]
    for i, part in enumerate(parts):
        part.to_parquet(tmp_path / f"p{i}.parquet", index=False)
    paths = [tmp_path / f"p{i}.parquet" for i in range(3)]
    seen = []
    whole, n = io.sample_rows(paths, None, check=lambda rb, p: seen.append((p.name, rb.num_rows)))
    pd.testing.assert_frame_equal(whole, io.read_tables(paths))
    assert n == 1500 and sum(k for _, k in seen) == 1500 and {p for p, _ in seen} == {"p0.parquet", "p1.parquet", "p2.parquet"}
    small, n = io.sample_rows(paths, 5000, seed=3)                    # fewer rows than max: all, in order
    pd.testing.assert_frame_equal(small, whole)
    a, n = io.sample_rows(paths, 300, seed=1, batch_size=64)
    b, _ = io.sample_rows(paths, 300, seed=1, batch_size=64)
    c, _ = io.sample_rows(paths, 300, seed=2, batch_size=64)
    assert n == 1500 and len(a) == 300
    pd.testing.assert_frame_equal(a, b)                                # same seed, same sample
    assert set(a["row_id"]) != set(c["row_id"])
    pos = whole.reset_index().set_index("row_id").loc[a["row_id"], "index"].to_numpy()
    assert (np.diff(pos) > 0).all()                                    # input order, no duplicates
    pd.testing.assert_frame_equal(a.reset_index(drop=True), whole.iloc[pos].reset_index(drop=True))
    # uniform: every file contributes about a third
    per_file = np.bincount(pos // 500, minlength=3)
    assert per_file.min() > 60, per_file
    frame.drop(columns=["x"]).head(10).to_parquet(tmp_path / "odd.parquet", index=False)
    with pytest.raises(DataError, match=r"odd\.parquet: columns differ from the first input \(missing \['x'\]"):
        io.sample_rows(paths + [tmp_path / "odd.parquet"], 100)


def test_ragged_csv_row_error_names_the_line_not_the_data(tmp_path):
    path = tmp_path / "cards.csv"
    path.write_text("id,amount,country\n1,2.5,DE\n\"2\",3.5,\"F\nR\"\n3,4.5,NL,4111111111111111\n4,5.5,IT\n")
    for read in (lambda: io.read_table(path), lambda: list(io.iter_batches(path)), lambda: io.input_schema(path)):
        try:
            read()
        except DataError as exc:
            msg = str(exc)
        else:
            continue          # input_schema may only see the first block
        assert "4111111111111111" not in msg and "NL" not in msg
        assert msg == f"{path}: cannot read as CSV: CSV parse error: expected 3 columns, got 4 on line 5 (row text not shown)"


def test_write_stream_plain_columns_skip_the_dictionary_and_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n = 5000
    table = pa.table({
        "id": [f"t{i:06d}" for i in range(n)],
        "score": rng.normal(size=n),
        "city": rng.choice(["a", "b", "c"], size=n),
        "ex": pa.array([[{"text": f"row {i}", "kind": "numeric"}] for i in range(n)]),
    })
    assert list(io.parquet_leaf_paths(table.schema)) == ["id", "score", "city", "ex.list.element.text",
                                                   "ex.list.element.kind"]
    dst = tmp_path / "out.parquet"
    assert io.write_stream(dst, table.schema, table.to_batches(max_chunksize=1000),
                           plain=["id", "score", "ex.list.element.text"]) == n
    assert pq.read_table(dst).equals(table)
    meta = pq.ParquetFile(dst).metadata.row_group(0)
    dictionary = {meta.column(i).path_in_schema: meta.column(i).has_dictionary_page
                  for i in range(meta.num_columns)}
    assert dictionary == {"id": False, "score": False, "city": True, "ex.list.element.text": False,
                          "ex.list.element.kind": True}


@pytest.mark.parametrize("env, backend", [(None, "system"), ("jemalloc", "jemalloc"), ("mimalloc", "mimalloc")])
def test_use_system_memory_pool_unless_the_environment_chooses(env, backend):
    """The CLI's streaming commands allocate Arrow buffers with malloc, unless
    ARROW_DEFAULT_MEMORY_POOL names a pool (a fresh interpreter: the pool is process-wide)."""
    import os
    import subprocess
    import sys

    import pyarrow as pa

    if backend not in pa.supported_memory_backends():
        pytest.skip(f"this pyarrow build has no {backend} pool")
    environ = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if env:
        environ["ARROW_DEFAULT_MEMORY_POOL"] = env
    code = ("import pyarrow as pa; from anomaly_vae import io; b = io.use_system_memory_pool(); "
            "print(b, pa.default_memory_pool().backend_name, pa.array([1, 2]).buffers()[1] is not None)")
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [backend, backend, "True"]


def test_read_small_parquet_reads_one_file_whole_or_says_no(tmp_path):
    t = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    pq.write_table(t, tmp_path / "t.parquet")
    pq.write_table(t.slice(0, 0), tmp_path / "empty.parquet")
    t.to_pandas().to_csv(tmp_path / "t.csv", index=False)
    seen = []
    schema, got = io.read_small_parquet(tmp_path / "t.parquet", 3, lambda s: seen.append(s) or ["b"])
    assert seen == [schema] and schema.names == ["a", "b"]
    assert got.num_rows == 3 and got.schema.names == ["b"] and got.column(0).to_pylist() == ["x", "y", "z"]
    assert io.read_small_parquet(tmp_path / "t.parquet", 2, lambda s: ["b"]) is None       # too many rows
    assert io.read_small_parquet(tmp_path / "t.parquet", 3, lambda s: None) is None       # refused
    assert io.read_small_parquet(tmp_path / "empty.parquet", 3, lambda s: ["a"]) is None
    assert io.read_small_parquet(tmp_path / "t.csv", 3, lambda s: ["a"]) is None
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="bad.parquet"):
        io.read_small_parquet(tmp_path / "bad.parquet", 3, lambda s: ["a"])


def test_write_stream_syncs_a_local_output_to_disk_before_its_name_appears(tmp_path, monkeypatch):
    """The manifest is fsynced and says "done"; the output it names must not be lost in a crash
    after the rename: its data is fsynced first (what a failed write never reaches)."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(io.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(io.os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    dst = tmp_path / "out.parquet"
    table = pa.table({"x": np.arange(10.0)})
    assert io.write_stream(dst, table.schema, table.to_batches()) == 10
    assert [e[0] for e in events] == ["fsync", "replace"]
    assert events[0][1] == events[1][1] and events[1][2] == str(dst)       # the temporary, then its move
    assert pq.read_table(dst).equals(table)

    events.clear()

    def broken():
        yield table.to_batches()[0]
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        io.write_stream(tmp_path / "bad.parquet", table.schema, broken())
    assert events == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]
