"""The shared options (-q, --debug, --tracking-uri, --threads, --device, --precision): one
definition, accepted before and after every subcommand, a value after the subcommand wins."""
from __future__ import annotations

import click
import pandas as pd
import pytest
from click.testing import CliRunner

from anomaly_vae.cli import main
from anomaly_vae.cli.state import LAZY_COMMANDS, SHARED_NAMES, SHARED_OPTIONS


def run(*args, ok: bool = True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, (r.output, r.exception)
    return r


def _commands(group: click.Group, ctx: click.Context):
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)           # also loads the lazy `retrain`
        yield cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, ctx)


def test_every_command_has_each_shared_option_once():
    ctx = click.Context(main)
    commands = [main, *_commands(main, ctx)]
    assert {c.name for c in commands} >= {"train", "score", "evaluate", "list", "promote", "demo", "retrain"}
    for cmd in commands:
        names = [p.name for p in cmd.params if p.name in SHARED_NAMES]
        assert sorted(names) == sorted(SHARED_NAMES), (cmd.name, names)
    assert len(SHARED_NAMES) == len(SHARED_OPTIONS) == 6


def test_lazy_retrain_help_matches_the_command():
    from pipelines.retrain import retrain_command

    assert LAZY_COMMANDS["retrain"][2] == retrain_command.short_help
    assert "retrain   Retrain on recent dated partitions" in run("--help").stdout
    opts = run("retrain", "--help").stdout
    assert opts.count("--tracking-uri") == 1 and opts.count("--quiet") == 1 and opts.count("--threads") == 1


@pytest.fixture(scope="module")
def model_and_data(fitted, frame, tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    frame.iloc[:200].to_parquet(root / "in.parquet", index=False)
    return fitted.save(root / "model"), root / "in.parquet", root


def test_quiet_and_debug_after_the_subcommand(model_and_data, tmp_path):
    model, src, _ = model_and_data
    loud = run("score", "-m", model, src, "-o", tmp_path / "a")
    assert "rows:" in loud.stdout
    for args in (("-q", "score", "-m", model, src, "-o", tmp_path / "b"),
                 ("score", "-m", model, src, "-o", tmp_path / "c", "-q"),
                 ("score", "-q", "-m", model, src, "-o", tmp_path / "d")):
        r = run(*args)
        assert r.stdout == "", args
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / "in.scored.parquet"),
                                  pd.read_parquet(tmp_path / "c" / "in.scored.parquet"))
    bad = run("score", "-m", tmp_path / "missing", src, "-o", tmp_path / "e", "--debug", ok=False)
    assert bad.exit_code == 2 and "Traceback" in bad.stderr              # --debug after: tracebacks on
    assert "Traceback" not in run("score", "-m", tmp_path / "missing", src, "-o", tmp_path / "e", ok=False).stderr
    r = run("score", "-m", model, src, "-o", tmp_path / "f", "--device", "tpu", ok=False)
    assert r.exit_code == 2 and "device" in r.stderr                    # --device after: validated


def test_value_after_the_subcommand_wins(tmp_path, new_mlflow_store):
    a, b = new_mlflow_store(tmp_path / "a"), new_mlflow_store(tmp_path / "b")
    r = run("--tracking-uri", a, "models", "list", "--tracking-uri", b)
    assert r.stdout.strip() == f"no registered models in store {b}"
    r = run("--tracking-uri", a, "models", "list", "nope", ok=False)
    assert f"in store {a}" in r.stderr
    r = run("models", "list", "nope", "--tracking-uri", b, "-q", ok=False)
    assert f"in store {b}" in r.stderr and r.stdout == ""


def test_retrain_uses_the_shared_options(tmp_path, new_mlflow_store):
    uri = new_mlflow_store(tmp_path)
    (tmp_path / "empty").mkdir()
    for args in (("-q", "--tracking-uri", uri, "retrain", "payments", tmp_path / "empty"),
                 ("retrain", "payments", tmp_path / "empty", "-q", "--tracking-uri", uri, "--threads", "1")):
        r = run(*args, ok=False)
        assert r.exit_code == 2 and "refused" in r.stderr and r.stdout == "", (args, r.output)
    r = run("retrain", "payments", tmp_path / "empty", "--device", "tpu", ok=False)
    assert r.exit_code == 2 and "device" in r.stderr
