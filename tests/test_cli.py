"""The `anomaly-vae` CLI end to end: real parquet files, a real SQLite MLflow store in tmp_path,
click's CliRunner and the installed console script (subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from anomaly_vae.cli import CLIError, _to_cli_error, main
from anomaly_vae.demo import DEMO_EXCLUDE, make_transactions
from anomaly_vae.errors import DataError

SCORE_COLS = ["anomaly_score", "recon_nll", "kl", "p_value", "is_anomaly", "top_features", "explanation"]
ENTRY_POINT = Path(sys.executable).with_name("anomaly-vae")
EXCLUDE = [a for c in DEMO_EXCLUDE for a in ("--exclude", c)]


def run(*args: str, ok: bool = True, **kw):
    """Invoke the real click group in-process; on unexpected failure show the output."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True, **kw)
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp-" in p.name) if d.exists() else []


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """2,400 demo transactions: train file (first 1,600 by time) + 3 incoming parts of 200 rows."""
    root = tmp_path_factory.mktemp("cli-data")
    df = make_transactions(2400, seed=3)
    train = root / "train.parquet"
    df.iloc[:1600].to_parquet(train, index=False)
    incoming = root / "incoming"
    incoming.mkdir()
    for i in range(3):
        df.iloc[1600 + 200 * i:1800 + 200 * i].to_parquet(incoming / f"part-{i}.parquet", index=False)
    return {"root": root, "train": train, "incoming": incoming, "frame": df}


@pytest.fixture(scope="module")
def model_dir(data) -> Path:
    """A local model trained through the CLI without MLflow."""
    out = data["root"] / "models" / "local"
    r = run("-q", "--threads", "1", "train", data["train"], "--label", "label", *EXCLUDE,
            "--epochs", "3", "--no-mlflow", "-o", out)
    assert r.output == ""                                   # --quiet: nothing on success
    assert (out / "manifest.json").is_file()
    return out


# ------------------------------------------------------------------ help
@pytest.mark.parametrize("cmd", [[], ["train"], ["score"], ["evaluate"], ["sample"], ["encode"],
                                 ["models"], ["models", "list"], ["models", "promote"], ["demo"]])
def test_every_command_has_help(cmd):
    r = run(*cmd, "--help")
    assert "Usage: " in r.output and "--help" in r.output
    if cmd and cmd != ["models"]:
        assert "Example" in r.output


def test_help_summaries_fit_and_defaults_are_shown():
    """Command summaries are not cut off ("...") and options show their defaults the same way."""
    for group in ([], ["models"]):
        listing = run(*group, "--help", terminal_width=80).output.split("Commands:")[1]
        assert "..." not in listing, listing
    assert "retrain" in run("--help").output
    train_help = " ".join(run("train", "--help").output.split())
    assert "[default: (automatic); x>=1]" in train_help and "[default: 0.01; 0<x<1]" in train_help
    assert "comma-separated" in train_help


def test_heavy_imports_stay_inside_commands():
    """--help must not pay for torch or MLflow: the cli/ modules and io.py import them only inside functions."""
    import ast

    import anomaly_vae.cli
    import anomaly_vae.io

    files = sorted(Path(anomaly_vae.cli.__file__).parent.glob("*.py")) + [Path(anomaly_vae.io.__file__)]
    assert len(files) > 2
    for file in files:
        tree = ast.parse(file.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top for a in n.names} | {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
        assert not {n for n in names if n.split(".")[0] in ("torch", "mlflow") or n in ("detector", "tracking")}, names


def test_usage_errors_exit_2():
    assert run("score", "data.parquet", ok=False).exit_code == 2                  # --model missing
    assert run("frobnicate", ok=False).exit_code == 2
    assert run("train", "x.parquet", "--register", "n", "--no-mlflow", ok=False).exit_code == 2


def test_error_mapping():
    assert _to_cli_error(DataError("f.parquet: column 'a': bad\nvalue")).exit_code == 2
    assert _to_cli_error(FileNotFoundError(2, "No such file", "x.parquet")).exit_code == 2
    err = _to_cli_error(RuntimeError("boom"))
    assert isinstance(err, CLIError) and err.exit_code == 1 and "--debug" in err.message
    assert "\n" not in _to_cli_error(DataError("a\nb")).message


# ------------------------------------------------------------------ local model
def test_train_summary(data, tmp_path):
    r = run("--threads", "1", "train", data["train"], "--label", "label", *EXCLUDE, "--id-col", "transaction_id",
            "--epochs", "2", "--seed", "1", "--target-fpr", "0.05", "--no-mlflow", "-o", tmp_path / "m")
    out = r.stdout
    n_fraud = int(data["frame"].iloc[:1600]["label"].sum())
    assert f"1,600 read, {1600 - n_fraud:,} used for training ({n_fraud} labelled anomalies left out)" in out
    assert "ids: transaction_id" in out and "epochs:     2" in out and "target FPR 0.05" in out
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["params"]["target_fpr"] == 0.05 and cfg["params"]["random_state"] == 1


def test_train_max_rows_samples_and_still_checks_every_label(data, tmp_path):
    """--max-rows fits on a seeded sample of the rows (same sample, same model); a bad label in a
    row the sample leaves out is still an error naming its file, with no model written."""
    args = ["-q", "--threads", "1", "train", data["train"], data["incoming"] / "part-0.parquet", "--label",
            "label", *EXCLUDE, "--epochs", "2", "--no-mlflow", "--max-rows", "700"]
    r = run(*args[1:], "-o", tmp_path / "a")
    assert "1,800 read (700 sampled)" in r.stdout
    run(*args, "-o", tmp_path / "b")
    assert (tmp_path / "a" / "weights.safetensors").read_bytes() == (tmp_path / "b" / "weights.safetensors").read_bytes()
    from anomaly_vae import VAEAnomalyDetector
    det = VAEAnomalyDetector.load(tmp_path / "a")
    assert det.calibration_["n_calibration"] < 700 * 0.2
    bad = data["frame"].iloc[1600:1800].copy()
    bad.loc[bad.index[-1], "label"] = 7                       # one bad label among 1,800 rows
    bad.to_parquet(tmp_path / "bad.parquet", index=False)
    r = run("train", data["train"], tmp_path / "bad.parquet", "--label", "label", "--no-mlflow",
            "--max-rows", "10", "-o", tmp_path / "c", ok=False)
    assert r.exit_code == 2 and r.stderr.startswith(f"Error: {tmp_path / 'bad.parquet'}: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


def test_train_accepts_comma_separated_and_repeated_column_lists(data, tmp_path):
    r = run("-q", "--threads", "1", "train", data["train"], "--label", "label", "--exclude", "customer_id,fraud_type",
            "--id-col", "transaction_id", "--categorical", "channel, country", "--categorical", "merchant_category",
            "--epochs", "1", "--no-mlflow", "-o", tmp_path / "m")
    assert r.output == ""
    params = json.loads((tmp_path / "m" / "config.json").read_text())["params"]
    assert params["exclude"] == ["customer_id", "fraud_type"] and params["id_cols"] == ["transaction_id"]
    assert params["categorical"] == ["channel", "country", "merchant_category"]


def _dup_amount(data, dst: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(pd.read_parquet(data["incoming"] / "part-0.parquet"), preserve_index=False)
    pq.write_table(table.append_column("amount", table.column("amount")), dst)
    return dst


def test_duplicate_columns_one_line_exit_2_no_output(data, model_dir, tmp_path):
    src = _dup_amount(data, tmp_path / "dup.parquet")
    for args in (["score", "--no-mlflow", "-m", model_dir, src, "-o", tmp_path / "scored"],
                 ["train", src, "--no-mlflow", "-o", tmp_path / "m"]):
        r = run(*args, ok=False)
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "dup.parquet" in lines[0] and "duplicate column name(s) ['amount']" in lines[0]
    assert not list((tmp_path / "scored").glob("*.parquet")) and not (tmp_path / "m").exists()


def test_score_hive_layout_keeps_partition_folders(data, model_dir, tmp_path):
    hive = tmp_path / "hive"
    for i, day in enumerate(("2026-01-01", "2026-01-02")):
        (hive / f"dt={day}").mkdir(parents=True)
        data["frame"].iloc[1600 + 100 * i:1700 + 100 * i].to_parquet(hive / f"dt={day}" / "part-0.parquet",
                                                                     index=False)
    out = tmp_path / "out"
    r = run("score", "--no-mlflow", "-m", model_dir, str(hive / "dt=*" / "*.parquet"), "-o", out)
    assert "2 scored" in r.stdout and "200 scored" in r.stdout
    for i, day in enumerate(("2026-01-01", "2026-01-02")):
        got = pd.read_parquet(out / f"dt={day}" / "part-0.scored.parquet")
        assert got["transaction_id"].tolist() == data["frame"]["transaction_id"].iloc[1600 + 100 * i:
                                                                                     1700 + 100 * i].tolist()
    # the directory itself is searched recursively; --resume recognises the nested outputs
    r = run("score", "--no-mlflow", "-m", model_dir, hive, "-o", out, "--resume")
    assert "0 scored, 2 skipped" in r.stdout
    # a flat directory still gives flat names (no collision)
    run("-q", "score", "--no-mlflow", "-m", model_dir, data["incoming"], "-o", tmp_path / "flat")
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == \
        ["_SUCCESS", "_manifest.json", "_score.lock"] + [f"part-{i}.scored.parquet" for i in range(3)]


def test_score_warns_on_missing_id_column_and_empty_inputs(data, model_dir, tmp_path):
    rows = pd.read_parquet(data["incoming"] / "part-0.parquet")
    rows.drop(columns=["transaction_id"]).head(20).to_parquet(tmp_path / "noid.parquet", index=False)
    rows.head(0).to_parquet(tmp_path / "zero.parquet", index=False)
    rows.head(0).to_csv(tmp_path / "header.csv", index=False)
    rows.head(20).to_csv(tmp_path / "rows.csv", index=False)
    r = run("score", "--no-mlflow", "-m", model_dir, tmp_path / "noid.parquet", tmp_path / "zero.parquet", tmp_path / "header.csv",
            tmp_path / "rows.csv", "-o", tmp_path / "out")
    warnings = [line for line in r.stderr.splitlines() if line.startswith("WARNING")]
    assert any("noid.parquet" in w and "'transaction_id'" in w for w in warnings), r.stderr
    assert any("zero.parquet: no rows" in w for w in warnings) and any("header.csv: no rows" in w for w in warnings)
    assert len(warnings) == 3, warnings
    assert "transaction_id" not in pd.read_parquet(tmp_path / "out" / "noid.scored.parquet").columns
    empty = pd.read_parquet(tmp_path / "out" / "header.scored.parquet")
    full = pd.read_parquet(tmp_path / "out" / "rows.scored.parquet")
    assert len(empty) == 0 and (empty.dtypes == full.dtypes).all()        # id column: string, not object


def test_score_warns_when_a_feature_column_is_null_in_every_row(data, model_dir, tmp_path):
    rows = pd.read_parquet(data["incoming"] / "part-0.parquet")
    rows.assign(amount=np.nan, country=None).to_parquet(tmp_path / "broken.parquet", index=False)
    rows.to_parquet(tmp_path / "fine.parquet", index=False)
    r = run("score", "--no-mlflow", "-m", model_dir, tmp_path / "broken.parquet", tmp_path / "fine.parquet", "-o", tmp_path / "out")
    warnings = [line for line in r.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "broken.parquet: column(s) ['amount', 'country'] are null in every row" \
        in warnings[0], r.stderr
    files = json.loads((tmp_path / "out" / "_manifest.json").read_text())["files"]
    assert [len(e.get("warnings", [])) for e in files.values()] == [1, 0]
    broken = pd.read_parquet(tmp_path / "out" / "broken.scored.parquet")
    fine = pd.read_parquet(tmp_path / "out" / "fine.scored.parquet")
    # missing where training never was raises the score (rows whose odd amount was nulled may drop)
    assert (broken["anomaly_score"] > fine["anomaly_score"]).mean() > 0.9


def test_label_errors_name_the_file(data, model_dir, tmp_path):
    rows = data["frame"].head(60)
    rows.assign(label=rows["label"] * 2).to_parquet(tmp_path / "twos.parquet", index=False)
    rows.assign(label=rows["label"].astype(float).where(rows.index % 7 != 0)).to_parquet(
        tmp_path / "gaps.parquet", index=False)
    for f, problem in (("twos.parquet", "other values, e.g. ['2']"), ("gaps.parquet", "values are missing")):
        for args in (["evaluate", "-m", model_dir, tmp_path / f, "--label", "label", "--no-mlflow"],
                     ["train", tmp_path / f, "--label", "label", "--no-mlflow", "-o", tmp_path / "m"]):
            r = run(*args, ok=False)
            assert r.exit_code == 2 and r.stderr.startswith(f"Error: {tmp_path / f}: label column 'label'"), r.stderr
            assert problem in r.stderr, r.stderr


def test_too_few_rows_errors_name_the_file(data, model_dir, tmp_path):
    data["frame"].head(0).to_parquet(tmp_path / "zerorows.parquet", index=False)
    for args in (["train", tmp_path / "zerorows.parquet", "--no-mlflow", "-o", tmp_path / "m"],
                 ["evaluate", "-m", model_dir, tmp_path / "zerorows.parquet", "--no-mlflow"]):
        r = run(*args, ok=False)
        assert r.exit_code == 2 and "zerorows.parquet" in r.stderr, r.stderr
        assert "n_samples" not in r.stderr and "evaluate_scores" not in r.stderr
    # all rows labelled anomalous: the detector's message gets the file name too
    data["frame"].head(50).assign(label=1).to_parquet(tmp_path / "allfraud.parquet", index=False)
    r = run("train", tmp_path / "allfraud.parquet", "--label", "label", "--no-mlflow", "-o", tmp_path / "m", ok=False)
    assert r.exit_code == 2 and r.stderr.startswith(f"Error: {tmp_path / 'allfraud.parquet'}: "), r.stderr


def test_score_directory_matches_explain(data, model_dir, tmp_path):
    from anomaly_vae import VAEAnomalyDetector

    out = tmp_path / "scored"
    r = run("score", "--no-mlflow", "-m", model_dir, data["incoming"], "-o", out, "--batch-size", "64")
    assert "3 scored" in r.stdout and "600 scored" in r.stdout and "rows/s" in r.stdout
    det = VAEAnomalyDetector.load(model_dir)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["model"]["uri"] == os.path.abspath(model_dir)      # the link, not its version dir
    for i in range(3):
        src = data["incoming"] / f"part-{i}.parquet"
        got = pd.read_parquet(out / f"part-{i}.scored.parquet")
        rows = pd.read_parquet(src)
        assert list(got.columns) == ["transaction_id"] + SCORE_COLS
        assert got["transaction_id"].tolist() == rows["transaction_id"].tolist()
        ref = det.explain(rows.drop(columns=["label"]))
        np.testing.assert_allclose(got["anomaly_score"], ref["anomaly_score"], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got["kl"], ref["kl"], rtol=1e-5, atol=1e-4)
        assert (got["is_anomaly"].to_numpy() == ref["is_anomaly"].to_numpy()).mean() > 0.99
        assert (got["top_features"] == ref["top_features"]).mean() > 0.98
        entry = manifest["files"][str(src.resolve())]
        assert entry["status"] == "done" and entry["rows_in"] == entry["rows_out"] == 200
        assert entry["flagged"] == int(got["is_anomaly"].sum())
    # --keep all passes every input column through
    run("-q", "score", "--no-mlflow", "-m", model_dir, data["incoming"] / "part-0.parquet", "-o", tmp_path / "all", "--keep", "all")
    cols = list(pd.read_parquet(tmp_path / "all" / "part-0.scored.parquet").columns)
    assert cols == list(data["frame"].columns) + SCORE_COLS


def test_resume_after_interrupted_run(data, model_dir, tmp_path):
    out = tmp_path / "scored"
    run("-q", "score", "--no-mlflow", "-m", model_dir, data["incoming"], "-o", out)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.scored.parquet")}
    assert len(done) == 3
    # simulate a run killed while writing part-1: its output and manifest entry are gone,
    # a stale temporary file is left behind
    (out / "part-1.scored.parquet").unlink()
    manifest = json.loads((out / "_manifest.json").read_text())
    del manifest["files"][str((data["incoming"] / "part-1.parquet").resolve())]
    (out / "_manifest.json").write_text(json.dumps(manifest))
    (out / ".part-1.scored.parquet.tmp-0badc0de").write_bytes(b"half a parquet file")

    r = run("score", "--no-mlflow", "-m", model_dir, data["incoming"], "-o", out, "--resume")
    assert "1 scored, 2 skipped" in r.stdout and "200 scored" in r.stdout
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.scored.parquet")}
    assert after["part-0.scored.parquet"] == done["part-0.scored.parquet"]     # not rewritten
    assert after["part-2.scored.parquet"] == done["part-2.scored.parquet"]
    assert pd.read_parquet(out / "part-1.scored.parquet").shape[0] == 200
    assert _leftovers(out) == []
    files = json.loads((out / "_manifest.json").read_text())["files"]
    assert len(files) == 3 and {e["status"] for e in files.values()} == {"done"}
    # without --resume everything is scored again
    run("-q", "score", "--no-mlflow", "-m", model_dir, data["incoming"], "-o", out)
    assert all(p.stat().st_mtime_ns != done.get(p.name) for p in out.glob("part-[02].scored.parquet"))


def _bad_files(data, d: Path) -> dict[str, tuple[Path, list[str]]]:
    rows = pd.read_parquet(data["incoming"] / "part-0.parquet")
    strings = rows.copy()
    strings["amount"] = strings["amount"].astype(str)
    strings.loc[150, "amount"] = "n/a-amount"
    strings.to_parquet(d / "strings.parquet", index=False)
    rows.drop(columns=["channel"]).to_parquet(d / "nochannel.parquet", index=False)
    (d / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(500))
    return {"strings": (d / "strings.parquet", ["strings.parquet", "'amount'"]),
            "missing": (d / "nochannel.parquet", ["nochannel.parquet", "'channel'"]),
            "corrupt": (d / "corrupt.parquet", ["corrupt.parquet"])}


@pytest.mark.parametrize("case", ["strings", "missing", "corrupt"])
def test_bad_input_exit_2_one_line_no_output(case, data, model_dir, tmp_path):
    src, must_name = _bad_files(data, tmp_path)[case]
    out = tmp_path / "scored"
    r = run("score", "--no-mlflow", "-m", model_dir, src, "-o", out, "--batch-size", "64", ok=False)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert all(s in lines[0] for s in must_name), lines[0]
    assert not list(out.glob("*.parquet")) and _leftovers(out) == []
    entry = json.loads((out / "_manifest.json").read_text())["files"][str(src.resolve())]
    assert entry["status"] == "failed" and entry["error"] in lines[0]


def test_keep_going_scores_the_good_inputs_and_still_exits_2(data, model_dir, tmp_path):
    bad = _bad_files(data, tmp_path)
    srcs = [data["incoming"] / "part-0.parquet", bad["strings"][0], bad["corrupt"][0],
            data["incoming"] / "part-2.parquet"]
    out = tmp_path / "scored"
    r = run("score", "--no-mlflow", "-m", model_dir, *srcs, "-o", out, "--batch-size", "64", ok=False)
    assert r.exit_code == 2 and not (out / "part-2.scored.parquet").exists()    # default: stop
    r = run("score", "--no-mlflow", "-m", model_dir, *srcs, "-o", out, "--resume", "--keep-going", ok=False)
    assert r.exit_code == 2, r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: 2 of 4 input(s) failed") and "strings.parquet" in last
    assert "files:   1 scored, 1 skipped (done), 2 failed" in r.stdout and "rows:    200 scored" in r.stdout
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-0.scored.parquet", "part-2.scored.parquet"]
    files = json.loads((out / "_manifest.json").read_text())["files"]
    assert sorted(e["status"] for e in files.values()) == ["done", "done", "failed", "failed"]
    assert _leftovers(out) == []


def test_installed_entry_point_bad_input_and_quiet(data, model_dir, tmp_path):
    """The console script itself: exit code 2 + one stderr line; --quiet success prints nothing."""
    src, _ = _bad_files(data, tmp_path)["strings"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([str(ENTRY_POINT), "score", "--no-mlflow", "-m", str(model_dir), str(src), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.count("\n") == 1 and "strings.parquet" in bad.stderr and "'amount'" in bad.stderr
    assert not list((tmp_path / "o").glob("*.parquet"))
    good = subprocess.run([str(ENTRY_POINT), "--quiet", "score", "--no-mlflow", "-m", str(model_dir),
                           str(data["incoming"] / "part-2.parquet"), "-o", str(tmp_path / "q")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert (good.returncode, good.stdout, good.stderr) == (0, "", "")
    assert (tmp_path / "q" / "part-2.scored.parquet").is_file()


def test_quiet_score_prints_nothing(data, model_dir, tmp_path):
    r = run("--quiet", "score", "--no-mlflow", "-m", model_dir, data["incoming"], "-o", tmp_path / "s")
    assert r.output == ""
    assert run("score", "--no-mlflow", "-m", tmp_path / "no-such-model", data["incoming"], "-o", tmp_path / "s2",
               ok=False).exit_code == 2


def test_evaluate_sample_encode_local(data, model_dir, tmp_path):
    from anomaly_vae import VAEAnomalyDetector
    from anomaly_vae.evaluate import evaluate

    r = run("evaluate", "-m", model_dir, data["incoming"], "--no-mlflow")
    det = VAEAnomalyDetector.load(model_dir)
    holdout = pd.concat([pd.read_parquet(p) for p in sorted(data["incoming"].glob("*.parquet"))], ignore_index=True)
    expected = evaluate(det, holdout, label="label")
    assert f"AUROC:     {expected['auroc']:.4f}" in r.stdout
    assert f"FPR:       {expected['fpr']:.4f}" in r.stdout
    assert run("evaluate", "-m", model_dir, data["incoming"], "--label", "nope", "--no-mlflow",
               ok=False).exit_code == 2

    run("-q", "sample", "-m", model_dir, "-n", "25", "--seed", "3", "-o", tmp_path / "synth.parquet")
    synth = pd.read_parquet(tmp_path / "synth.parquet")
    assert len(synth) == 25 and {"amount", "merchant_category", "channel"} <= set(synth.columns)

    run("-q", "encode", "-m", model_dir, data["incoming"] / "part-0.parquet", "-o", tmp_path / "z.parquet",
        "--batch-size", "50")
    z = pd.read_parquet(tmp_path / "z.parquet")
    k = det.config_.latent_dim
    assert list(z.columns) == ["transaction_id"] + [f"z{j}" for j in range(k)] and len(z) == 200
    rows = pd.read_parquet(data["incoming"] / "part-0.parquet")
    np.testing.assert_allclose(z.iloc[:, 1:].to_numpy(), det.encode(rows), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ MLflow registry
def test_train_register_promote_score_by_alias(data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = run("-q", "--tracking-uri", uri, "--threads", "1", "train", data["train"], "--label", "label",
            *EXCLUDE, "--epochs", "2", "--register", "cli-test", "-o", tmp_path / "m")
    assert r.output == ""                                     # --quiet silences MLflow's chatter too
    assert "cli-test v1" in run("--tracking-uri", uri, "models", "list", "cli-test").stdout
    r = run("--tracking-uri", uri, "models", "promote", "cli-test", "1", "--alias", "champion")
    assert "cli-test@champion -> version 1" in r.stdout
    listing = run("--tracking-uri", uri, "models", "list", "cli-test").stdout
    assert "@champion" in listing
    everything = run("--tracking-uri", uri, "models", "list").stdout.splitlines()     # no NAME: every model
    assert [line.split() for line in everything] == [["cli-test", "latest", "v1", "@champion=v1"],
                                                     ["store:", uri]], everything
    empty_store = f"sqlite:///{tmp_path / 'empty.db'}"
    assert "no registered models" in run("--tracking-uri", empty_store, "models", "list").stdout
    bad = run("--tracking-uri", uri, "models", "promote", "cli-test", "9", ok=False)
    assert bad.exit_code == 2 and "no version 9" in bad.stderr

    out = tmp_path / "scored"
    r = run("--tracking-uri", uri, "score", "-m", "models:/cli-test@champion", data["incoming"], "-o", out)
    assert "cli-test v1" in r.stdout and "600 scored" in r.stdout
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["model"]["name"] == "cli-test" and manifest["model"]["version"] == 1
    # same scores as the local model dir written by the same train command
    run("-q", "score", "--no-mlflow", "-m", tmp_path / "m", data["incoming"], "-o", tmp_path / "local")
    a = pd.read_parquet(out / "part-0.scored.parquet")
    b = pd.read_parquet(tmp_path / "local" / "part-0.scored.parquet")
    pd.testing.assert_frame_equal(a, b)

    r = run("--tracking-uri", uri, "evaluate", "-m", "models:/cli-test/1", data["incoming"])
    assert "AUROC:" in r.stdout and "mlflow run:" in r.stdout
    missing = run("--tracking-uri", uri, "score", "-m", "models:/cli-test@nope", data["incoming"], "-o",
                  tmp_path / "x", ok=False)
    assert missing.exit_code == 2 and "nope" in missing.stderr


# ------------------------------------------------------------------ demo
def test_demo_small_without_mlflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("--threads", "1", "demo", "--rows", "3000", "--epochs", "2", "--no-mlflow")
    out = r.stdout
    assert "AUROC" in out and "FPR on normals" in out and "flagged rows" in out
    scored = pd.read_parquet(tmp_path / "scored" / "demo" / "transactions_holdout.scored.parquet")
    assert len(scored) == 900
    assert f"flagged rows          {int(scored['is_anomaly'].sum()):,}" in out
    assert (tmp_path / "models" / "demo" / "manifest.json").is_file()
    # a second run reuses the data file
    mtime = (tmp_path / "data" / "transactions.parquet").stat().st_mtime_ns
    assert "reusing" in run("--threads", "1", "demo", "--rows", "3000", "--epochs", "1", "--no-mlflow").stdout
    assert (tmp_path / "data" / "transactions.parquet").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_demo_with_mlflow_registers_champion(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("ANOMALY_VAE_HOME", str(tmp_path / "home"))     # as `make demo` sets it
    r = run("--threads", "1", "demo", "--rows", "3000", "--epochs", "2")
    store = f"sqlite:///{tmp_path}/home/mlruns/mlflow.db"
    assert f"mlflow ui --backend-store-uri {store}" in r.stdout and f"store:  {store}" in r.stdout
    assert (tmp_path / "home" / "mlruns" / "mlflow.db").is_file()
    monkeypatch.chdir(tmp_path / "data")                               # the store does not move with the cwd
    listing = run("models", "list", "demo-transactions").stdout
    assert "demo-transactions v1" in listing and "@champion" in listing


# ------------------------------------------------------------------ pipelines/README.md
def test_pipelines_readme_try_it_makes_a_dated_window(tmp_path, monkeypatch):
    """The 'Try it' snippet writes data/YYYY-MM-DD.parquet files that the retrain window reads by date."""
    import re

    from pipelines.window import list_partitions, select_window

    text = (Path(__file__).resolve().parents[1] / "pipelines" / "README.md").read_text()
    section = text.split("## Try it", 1)[1]
    code = re.search(r"python - <<'PY'\n(.*?)\nPY\n", section, re.S).group(1)
    assert "anomaly-vae retrain payments data/ --days 8" in section
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "pipelines/README.md", "exec"), {})
    window = select_window(list_partitions(["data/"]), days=8)
    assert [str(p.date) for p in window] == [f"2026-01-0{d}" for d in range(1, 9)]
    assert sum(len(pd.read_parquet(p.path)) for p in window) == 8_000


def test_device_and_precision_options(tmp_path, data, model_dir):
    """--device cpu scores exactly as the default on a CPU machine; an unavailable or unknown
    device is a one-line error (exit 2); --precision bfloat16 scores close to float32."""
    import torch

    src = data["incoming"] / "part-0.parquet"
    run("-q", "score", "--no-mlflow", "-m", model_dir, src, "-o", tmp_path / "default")
    run("-q", "--device", "cpu", "score", "--no-mlflow", "-m", model_dir, src, "-o", tmp_path / "cpu")
    a = pd.read_parquet(tmp_path / "default" / "part-0.scored.parquet")
    b = pd.read_parquet(tmp_path / "cpu" / "part-0.scored.parquet")
    if not torch.cuda.is_available():          # auto = cpu here
        pd.testing.assert_frame_equal(a, b)
        r = run("-q", "--device", "cuda", "score", "--no-mlflow", "-m", model_dir, src, "-o", tmp_path / "gpu", ok=False)
        assert r.exit_code == 2 and "CUDA is not available" in r.output
    r = run("-q", "--device", "tpu", "score", "--no-mlflow", "-m", model_dir, src, "-o", tmp_path / "x", ok=False)
    assert r.exit_code == 2 and "device" in r.output
    run("-q", "--precision", "bfloat16", "score", "--no-mlflow", "-m", model_dir, src, "-o", tmp_path / "bf16")
    c = pd.read_parquet(tmp_path / "bf16" / "part-0.scored.parquet")
    np.testing.assert_allclose(c.anomaly_score, a.anomaly_score, rtol=0.05, atol=1.0)


@pytest.mark.parametrize("args, code", [(["--version"], 0), (["no-such-command"], 2), (["score"], 2)])
def test_entry_point_exits_quickly_with_the_commands_status_and_runs_atexit(tmp_path, args, code):
    """`cli.run` (the console script) skips only the interpreter's module teardown: the exit
    status is the command's, atexit handlers still run, and the output is flushed."""
    marker = tmp_path / "atexit.txt"
    script = (f"import atexit, sys; atexit.register(lambda: open({str(marker)!r}, 'w').write('ran')); "
              f"sys.argv = ['anomaly-vae', *{args!r}]; print('before', end=''); "
              "from anomaly_vae.cli import run; run()")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert marker.read_text() == "ran"
    assert proc.stdout.startswith("before")
    if code == 0:
        assert "version" in proc.stdout
    else:
        assert "Error" in proc.stderr or "Usage" in proc.stderr


@pytest.mark.parametrize("preset, imported_first, backend", [
    (None, False, "system"), ("jemalloc", False, "jemalloc"), (None, True, "built-in")])
def test_console_script_picks_arrow_allocator_before_pyarrow_loads(preset, imported_first, backend):
    """`run` sets ARROW_DEFAULT_MEMORY_POOL before pyarrow is imported, so Arrow's C++ default
    pool (not only pyarrow's) is malloc; a value the user set wins; once pyarrow is loaded it is
    too late, and the build's own default stays (a fresh interpreter each: the pool is process-wide)."""
    import pyarrow as pa

    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if preset:
        env["ARROW_DEFAULT_MEMORY_POOL"] = preset

    def pool(code: str) -> str:
        out = subprocess.run([sys.executable, "-c", code + "import pyarrow as pa; print(pa.default_memory_pool().backend_name)"],
                             env=env, capture_output=True, text=True, check=True)
        return out.stdout.strip()

    if backend == "built-in":
        backend = pool("")
        if backend == "system":
            pytest.skip("this pyarrow build allocates with malloc by default")
    elif backend not in pa.supported_memory_backends():
        pytest.skip(f"this pyarrow build has no {backend} pool")
    assert pool(("import pyarrow; " if imported_first else "")
                + "from anomaly_vae.cli import _choose_arrow_allocator; _choose_arrow_allocator(); ") == backend
