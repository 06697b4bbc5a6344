"""`anomaly-vae score`, `encode` and `sample`: use a model on files."""
from __future__ import annotations

import os
import time
from pathlib import Path

import click

from ..errors import DataError
from .state import State, _mlflow_options, _model_option, pass_state


# ------------------------------------------------------------------ score
@click.command(short_help="Score files in streamed batches to <name>.scored.parquet.")
@_model_option
@click.argument("inputs", nargs=-1, required=True)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Output directory: one <name>.scored.parquet per input, plus _manifest.json.")
@click.option("--keep", type=click.Choice(["ids", "all"]), default="ids", show_default=True,
              help="Pass through the model's id columns, or every input column.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32768, show_default=True,
              help="Rows per record batch (memory grows with it); small files are scored together "
                   "up to this many rows.")
@click.option("--resume", is_flag=True, help="Skip inputs the manifest marks done (after an interrupted run).")
@click.option("--keep-going", "-k", is_flag=True,
              help="On an input with bad data, record it as failed and score the others; exit 2 at the end.")
@click.option("--wait", is_flag=True,
              help="If another score run is writing into OUTPUT, wait for it instead of exiting 3.")
@click.option("--wait-timeout", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="Seconds to wait for the other run with --wait.")
@_mlflow_options
@pass_state
@click.pass_context
def score(ctx: click.Context, state: State, model: str, inputs: tuple[str, ...], output: str, keep: str,
          batch_size: int, resume: bool, keep_going: bool, wait: bool, wait_timeout: float, no_mlflow: bool,
          experiment: str) -> None:
    """Score INPUTS (parquet/CSV files, directories searched recursively, or globs) in
    streamed batches.

    Output columns: the id columns (or all with --keep all) + anomaly_score, recon_nll, kl,
    p_value, is_anomaly, top_features. Each output appears only when complete. A file named
    directly goes to OUTPUT/<name>.scored.parquet; files found under a directory or glob keep
    their sub-folders below it (incoming/dt=2026-01-01/part-0.parquet ->
    OUTPUT/dt=2026-01-01/part-0.scored.parquet), the same path on every run. With --resume,
    an output that the manifest gives to another input is never overwritten.

    A bad input stops the run (finished outputs are kept); with --keep-going the other inputs
    are scored first, and the exit code is still 2. Nightly jobs: --resume --keep-going.
    --resume refuses (exit 2) when the model changed since the manifest was written. One run at
    a time per OUTPUT: a second one exits 3 at once (or waits, with --wait).

    Each invocation is one MLflow run (unless --no-mlflow), tag anomaly_vae.run_type=scoring,
    in the experiment of the model's training run (a local model directory, or --experiment
    given: that experiment): rows, flagged, flag_rate vs target_fpr, score quantiles, per-feature
    and score PSI against the training profile, files scored/skipped/failed, rows/s, a score
    histogram over the calibration scores and the top 100 flagged rows. A run that fails
    ends FAILED; one locked out by another run (exit 3) logs nothing. See README: Nightly runs
    in the MLflow UI.

    An id column of the model missing from an input, or an input with no rows, is a warning
    (on stderr unless -q, and in the file's _manifest.json entry), not an error: the file is still scored,
    without that key column / into an empty output with the usual columns.

    \b
    Examples:
      anomaly-vae score -m models:/payments@champion incoming/ -o scored/
      anomaly-vae score -m models/demo data/transactions_holdout.parquet -o scored/demo --keep all
      anomaly-vae -q score -m models:/payments/3 'landing/*.parquet' -o scored/ --resume
    """
    # first thing: the MLflow run's process imports MLflow (~3 s) while this one imports
    # pyarrow and torch and loads the model; it is closed if anything below fails
    child = None if no_mlflow else _prepare_scoring_run(state)
    run = None
    try:
        from .. import batch, io

        pairs = io.expand_inputs_with_roots(inputs)
        det, info = state.load_model(model)
        _one_torch_thread_per_worker()
        io.use_system_memory_pool()
        files = [f for f, _ in pairs]
        run = None if no_mlflow else _scoring_run(
            ctx, state, det, info, files, experiment, child,
            {"output": output, "batch_size": batch_size, "keep": keep, "resume": resume, "keep_going": keep_going})
    finally:
        if run is None and child is not None:
            child.close()
    hooks = {} if run is None else {"on_start": run.start, "on_batch": run.on_batch, "on_input": run.on_input}
    t0 = time.perf_counter()
    try:
        result = batch.score_files(det, files, output, model_info=info, keep=keep, workers=state.threads,
                                   batch_size=batch_size, resume=resume, progress=state.progress,
                                   keep_going=keep_going, roots=[r for _, r in pairs], wait=wait,
                                   wait_timeout=wait_timeout, **hooks)
        wall = time.perf_counter() - t0
        if run is not None:
            with state.muted():
                run.finish(result["summary"])
    except BaseException as exc:       # bad input, SIGTERM (SystemExit), Ctrl-C: the run ends FAILED
        if run is not None:
            with state.muted():
                run.fail(exc)
        raise
    s = result["summary"]
    rate = s["rows"] / wall if wall > 0 else 0.0
    label = info["uri"] if info.get("version") is None else f"{info['name']} v{info['version']} ({info['uri']})"
    state.echo(f"model:   {label}")
    state.echo(f"files:   {s['scored']} scored" + (f", {s['skipped']} skipped (done)" if s["skipped"] else "")
               + (f", {s['failed']} failed" if s["failed"] else ""))
    state.echo(f"rows:    {s['rows']:,} scored, {s['flagged']:,} flagged "
               f"({100 * s['flagged'] / max(s['rows'], 1):.2f}%), {rate:,.0f} rows/s")
    state.echo(f"output:  {output} (manifest {io.join(output, batch.MANIFEST)})")
    if run is not None:
        state.resolved_uri = state.resolved_uri or run.tracking_uri      # printed as "store:" below
        state.echo(f"mlflow:  run {run.run_id} ({'FAILED' if s['failed'] else 'FINISHED'}), "
                   f"experiment {run.experiment_id}")
        state.echo(f"ui:      {run.experiment_ui()}")
    if s["failed"]:
        raise DataError(f"{s['failed']} of {s['files']} input(s) failed (the others were scored; see "
                        f"{io.join(output, batch.MANIFEST)}); first: {s['failures'][0]}")


def _one_torch_thread_per_worker() -> None:
    """`score` parallelises over batches (--threads workers, default every CPU), each batch's
    torch ops on one thread: faster than intra-op threads for this small MLP, no oversubscription."""
    import torch
    torch.set_num_threads(1)


def _prepare_scoring_run(state: State):
    """The child process of this invocation's MLflow run, started before the model is loaded:
    it imports MLflow and opens the store meanwhile (`scoring_runs.prepare_child`)."""
    import logging

    from ..scoring_runs import prepare_child

    for name in ("mlflow", "alembic"):        # as State.tracking() does, without importing MLflow here
        logging.getLogger(name).setLevel(logging.ERROR if state.quiet else logging.WARNING)
    if not state.progress:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return prepare_child(state.resolved_uri or state.tracking_uri)


def _scoring_run(ctx: click.Context, state: State, det, info: dict, files: list, experiment: str, child,
                 params: dict):
    """The MLflow run record of this invocation; it opens itself (store, experiment, run) in
    `child` once the output lock is held, so MLflow never competes with scoring for the GIL."""
    from ..scoring_runs import ScoringRun

    explicit = ctx.get_parameter_source("experiment") not in (click.core.ParameterSource.DEFAULT, None)
    return ScoringRun(det, info, experiment=experiment, explicit_experiment=explicit, inputs=files,
                      params=params, tracking_uri=state.resolved_uri or state.tracking_uri, child=child)


# ------------------------------------------------------------------ sample / encode
@click.command(short_help="Draw synthetic rows from a model.")
@_model_option
@click.option("-n", "--rows", "n", type=click.IntRange(min=1), default=100, show_default=True,
              help="Number of synthetic rows.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Output .parquet (or .csv) file.")
@pass_state
def sample(state: State, model: str, n: int, seed: int, output: str) -> None:
    """Draw synthetic rows from the model in the training schema (timestamps as timestamps).

    \b
    Example:
      anomaly-vae sample -m models/demo -n 1000 -o synthetic.parquet
    """
    from .. import io

    det, _ = state.load_model(model)
    rows = io.write_frame(det.sample(n, seed=seed), output)
    state.echo(f"wrote {rows:,} synthetic rows to {output}")


@click.command(short_help="Latent means (z0..zK) of every row, with id columns.")
@_model_option
@click.argument("data", nargs=-1, required=True)
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Output .parquet file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=65536, show_default=True)
@pass_state
def encode(state: State, model: str, data: tuple[str, ...], output: str, batch_size: int) -> None:
    """Write latent means z0..zK (plus id columns) for every row of DATA.

    \b
    Example:
      anomaly-vae encode -m models:/payments@champion data/transactions.parquet -o latents.parquet
    """
    from tqdm.auto import tqdm

    from .. import batch, io

    paths = io.expand_inputs(data)
    det, _ = state.load_model(model)
    io.use_system_memory_pool()
    total = sum(io.count_rows(p) or 0 for p in paths) or None
    with tqdm(total=total, unit="row", unit_scale=True, desc="encode", disable=not state.progress, leave=False) as bar:
        rows = batch.encode_files(det, paths, output, batch_size=batch_size, progress=bar.update)
    state.echo(f"wrote {rows:,} rows x {det.config_.latent_dim} latent dims to {output}")
