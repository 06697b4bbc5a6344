"""Scheduled retrain: lock -> window -> schema check -> candidate -> shared holdout -> gates -> registry.

Usage (also ``anomaly-vae retrain``)::

    python -m pipelines.retrain payments 'data/dt=*.parquet' --days 28 --label label \\
        --exclude customer_id --exclude fraud_type

One run: take the lock ``<lock dir>/<name>.lock``; select the window (the last ``--days``
days or ``--files`` files, by the date in the file names); stop as a no-op when a finished
decision run already carries this window's key; check that the champion's feature columns
exist in every file and cast to their kinds; train a candidate on all but the newest
partition(s); score candidate and champion on that same holdout; apply the gates
(`pipelines.gates.should_promote`); register the candidate, alias it ``challenger`` and move
``champion`` to it only when every gate passes; log the decision run (see `pipelines.record`).

Exit codes: 0 promoted, kept or no-op; 1 internal error; 2 bad input (empty window, schema
incompatible with the champion, unreadable file, label missing: decision "refused");
3 locked out by another run.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):        # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib
import datetime as dt
import io
import logging
from typing import Any, NamedTuple, Sequence

import click
import pandas as pd

from anomaly_vae import __version__
from anomaly_vae.cli.state import State, shared_options
from anomaly_vae.drift import DEFAULT_ALERT, psi_plot
from anomaly_vae.errors import AnomalyVAEError
from pipelines.gates import (DEFAULT_FPR_BAND, DEFAULT_MAX_SCORE_PSI, DEFAULT_TARGET_FPR,
                             DEFAULT_TOLERANCE, Decision, should_promote)
from pipelines.holdout import (check_compatible, comparison_table, holdout_metrics, load_partitions,
                               split_holdout, weekday_warning, window_drift,
                               worst_drift)
from pipelines.window import LockedError, Partition, list_partitions, run_lock, select_window, window_key

__all__ = ["run_retrain", "retrain_command", "retrain", "RetrainResult", "Decision", "should_promote",
           "holdout_metrics", "split_holdout", "EXIT_OK", "EXIT_ERROR", "EXIT_BAD_INPUT", "EXIT_LOCKED"]
log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_LOCKED = 0, 1, 2, 3
DEFAULT_DAYS = 28
DEFAULT_EXPERIMENT = "anomaly-vae-retrain"   # decision runs (pipelines.record)
TRAIN_EXPERIMENT = "anomaly-vae"             # the candidates' training runs (anomaly_vae.tracking)


class RetrainResult(NamedTuple):
    """Outcome of one retrain. decision: promoted | kept | refused | noop."""

    decision: str
    exit_code: int
    reasons: list[str]
    name: str
    window_key: str
    window: list[str]                       # parent/name of each partition in the window
    run_id: str | None = None               # the decision run (for a no-op: the earlier one)
    candidate_version: int | None = None
    champion_before: int | None = None
    champion_after: int | None = None
    candidate: dict | None = None           # holdout metrics
    champion: dict | None = None
    drift: pd.DataFrame | None = None
    drift_alerts: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    rows: dict | None = None                # train / holdout row counts


def default_lock_dir(uri: str) -> Path:
    """<SQLite store dir>/locks for a local store, else the locks/ beside the default SQLite store
    (ANOMALY_VAE_HOME or the XDG data directory; never the working directory)."""
    from anomaly_vae.store import default_tracking_uri

    if not uri.startswith("sqlite:////"):
        uri = default_tracking_uri()
    return Path(uri[len("sqlite:///"):].split("?", 1)[0]).parent / "locks"


# ------------------------------------------------------------------ run
def run_retrain(name: str, data: Sequence[str], *, days: int | None = None, files: int | None = None,
                end_date: dt.date | None = None, label: str | None = None,
                exclude: Sequence[str] = (), epochs: int | None = None, seed: int = 0,
                target_fpr: float = DEFAULT_TARGET_FPR, tolerance: float = DEFAULT_TOLERANCE,
                fpr_band: float = DEFAULT_FPR_BAND, max_score_psi: float | None = DEFAULT_MAX_SCORE_PSI,
                psi_alert: float = DEFAULT_ALERT, holdout_partitions: int = 1, holdout_fraction: float = 0.2,
                tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                train_experiment: str = TRAIN_EXPERIMENT, lock_dir: str | Path | None = None,
                wait: bool = False, wait_timeout: float = 3600.0, threads: int | None = None,
                force: bool = False, device: str | None = None, precision: str | None = None) -> RetrainResult:
    """Run one retrain of registered model `name` on a window of `data`; see the module doc.

    Raises LockedError (exit 3) when another run holds the lock, and ConfigError / DataError
    (exit 2) for bad options or an empty window, before anything is logged. Bad input found
    once the decision run exists (schema incompatible, unreadable partition, missing label)
    returns decision "refused" with exit_code 2. Any other exception is a bug (exit 1); the
    decision run is then marked FAILED with an ``error`` tag.
    """
    from anomaly_vae import tracking
    from pipelines import record

    if days is None and files is None and end_date is None:
        days = DEFAULT_DAYS
    runtime = {k: v for k, v in (("device", device), ("precision", precision)) if v}
    if runtime:
        from anomaly_vae.config import Config
        Config(**runtime)                   # a bad --device / --precision: ConfigError before anything runs
    uri = tracking.configure(tracking_uri)
    if threads:
        import torch
        torch.set_num_threads(threads)
    parts = select_window(list_partitions(data), days=days, files=files, end=end_date)
    config = {"name": name, "label": label, "exclude": sorted(exclude), "epochs": epochs, "seed": seed,
              "target_fpr": target_fpr, "tolerance": tolerance, "fpr_band": fpr_band,
              "max_score_psi": max_score_psi, "holdout_partitions": holdout_partitions,
              "holdout_fraction": holdout_fraction, "anomaly_vae": __version__}
    key = window_key(parts, config)
    labels = [p.label for p in parts]
    lock_path = Path(lock_dir or default_lock_dir(uri)) / f"{name}.lock"
    base = {"name": name, "window_key": key, "window": labels}

    with run_lock(lock_path, wait=wait, timeout=wait_timeout):
        prior = None if force else record.find_processed(experiment, name, key)
        if prior is not None:
            champ = tracking.get_alias_version(name, "champion")
            return RetrainResult(
                "noop", EXIT_OK, [f"window already processed by run {prior['run_id']} (decision "
                                  f"{prior['decision']}, candidate v{prior['candidate_version']}); "
                                  "nothing to do (pass --force to retrain anyway)"],
                **base, run_id=prior["run_id"], champion_before=champ, champion_after=champ)
        first, last = parts[0], parts[-1]
        run_name = f"retrain-{name}-{last.date or last.path.stem}"
        run_tags = {"window_start": str(first.date or first.label), "window_end": str(last.date or last.label),
                    "window_files": str(len(parts))}
        params = {**config, "data": list(map(str, data)), "days": days, "files": files,
                  "end_date": end_date, "psi_alert": psi_alert, "force": force}
        run_id = record.start(experiment, name=name, key=key, run_name=run_name, tags=run_tags,
                              params=params)
        status = "FAILED"
        try:
            result = _retrain(run_id, name, parts, base, label=label, exclude=exclude,
                              epochs=epochs, seed=seed, target_fpr=target_fpr, tolerance=tolerance,
                              fpr_band=fpr_band, max_score_psi=max_score_psi, psi_alert=psi_alert,
                              holdout_partitions=holdout_partitions, holdout_fraction=holdout_fraction,
                              train_experiment=train_experiment, threads=threads,
                              runtime=runtime)
            status = "FINISHED"
            return result
        except AnomalyVAEError as exc:
            reason = " ".join(str(exc).split())
            record.set_tags(run_id, {"decision": "refused", "reasons": reason})
            status = "FINISHED"
            champ = tracking.get_alias_version(name, "champion")
            return RetrainResult("refused", EXIT_BAD_INPUT, [reason], **base, run_id=run_id,
                                 champion_before=champ, champion_after=champ)
        except BaseException as exc:
            record.set_tags(run_id, {"error": f"{type(exc).__name__}: {exc}"})
            raise
        finally:
            record.finish(run_id, status)


def _retrain(run_id: str, name: str, parts: Sequence[Partition], base: dict[str, Any], *,
             label: str | None, exclude: Sequence[str], epochs: int | None, seed: int,
             target_fpr: float, tolerance: float, fpr_band: float, max_score_psi: float | None,
             psi_alert: float, holdout_partitions: int, holdout_fraction: float,
             train_experiment: str, threads: int | None, runtime: dict[str, str]) -> RetrainResult:
    from anomaly_vae import tracking
    from pipelines import record

    champion_before = tracking.get_alias_version(name, "champion")
    champion = None
    if champion_before is not None:
        champion, _ = tracking.load_detector(f"models:/{name}/{champion_before}")
        champion.set_params(**runtime)                          # --device / --precision
        if label is None and champion.label:                   # as `evaluate`: the model's label column
            label = champion.label
            log.info("label column %r: the one champion v%s was trained with", label, champion_before)
    frames = load_partitions(parts, label)
    if champion is not None:
        check_compatible(champion, parts, frames, f"{name} v{champion_before}")
    groups = [p.date or p.path for p in parts]                 # all files of one day stay together
    train_df, holdout_df, how = split_holdout(frames, holdout_partitions, holdout_fraction, groups)
    distinct = list(dict.fromkeys(groups))
    held = set(distinct[-holdout_partitions:]) if len(distinct) > holdout_partitions else set()
    train_dates = [p.date for p, g in zip(parts, groups) if g not in held]
    rows = {"train": len(train_df), "holdout": len(holdout_df), "holdout_rule": how}
    log.info("window %s..%s: %s train rows, %s holdout rows (%s)", parts[0].label, parts[-1].label,
             f"{len(train_df):,}", f"{len(holdout_df):,}", how)

    from anomaly_vae.detector import VAEAnomalyDetector
    candidate = VAEAnomalyDetector(label=label, exclude=tuple(exclude) or None, max_epochs=epochs,
                                   target_fpr=target_fpr, random_state=seed, n_threads=threads, **runtime)
    candidate.fit(train_df)
    warnings = weekday_warning(candidate, train_dates)
    for w in warnings:
        log.warning(w)
    cand_m = holdout_metrics(candidate, holdout_df, label)
    champ_m = holdout_metrics(champion, holdout_df, label) if champion is not None else None
    decision = should_promote(cand_m, champ_m, tolerance=tolerance, target_fpr=target_fpr,
                              fpr_band=fpr_band, max_score_psi=max_score_psi)

    window_df = pd.concat([train_df, holdout_df], ignore_index=True)
    ref = champion if champion is not None else candidate
    drift = worst_drift(window_drift(ref, window_df, label, alert=psi_alert, seed=seed),
                        window_drift(ref, holdout_df, label, alert=psi_alert, seed=seed), psi_alert)
    alerts = [f"{f} {p:.3f}" for f, p, a in zip(drift["feature"], drift["psi"], drift["alert"]) if a]

    # evidence first, then the registry: a crash in between leaves a FAILED run, not a silent move
    table = comparison_table(cand_m, champ_m)
    record.log_comparison(run_id, table)
    record.log_drift(run_id, drift, psi_plot(drift, psi_alert,
                                             title=f"PSI vs {'champion' if champion else 'candidate'} "
                                                   f"training profile"))
    record.log_window(run_id, {"files": [{"file": p.label, "date": str(p.date), "size": p.size}
                                         for p in parts], "rows": rows})
    record.log_metrics(run_id, {**{f"candidate_{k}": v for k, v in cand_m.items()},
                                **{f"champion_{k}": v for k, v in (champ_m or {}).items()},
                                "drift_alerts": len(alerts),
                                "drift_max_feature_psi": float(drift.loc[drift["kind"] != "score",
                                                                         "psi"].max())})
    train_run = tracking.log_training_run(
        candidate, train_df, dataset_name=f"{name}-{parts[0].date or 'window'}..{parts[-1].date or len(parts)}",
        dataset_source=str(parts[0].path.parent.resolve()), eval_df=holdout_df, label=label,
        experiment=train_experiment, run_name=f"{name}-candidate-{parts[-1].date or parts[-1].path.stem}",
        register_as=name, tags={"window_key": base["window_key"], "retrain_run_id": run_id,
                                "anomaly_vae.role": "candidate"})
    version = int(train_run.version)
    outcome = "promoted" if decision.promote else "kept"
    champion_after = version if decision.promote else champion_before

    record.set_tags(run_id, {
        "decision": outcome, "reasons": " | ".join(decision.reasons),
        "candidate_run_id": train_run.run_id, "candidate_version": version,
        "champion_before": champion_before if champion_before is not None else "none",
        "champion_after": champion_after if champion_after is not None else "none",
        "drift_reference": "champion" if champion is not None else "candidate",
        "drift_alert": str(bool(alerts)).lower(), "drift_alerts": ", ".join(alerts) or "none",
        "warnings": " | ".join(warnings) or None})
    record.tag_version(name, version, {"window_key": base["window_key"], "retrain_run_id": run_id,
                                       "decision": outcome})
    tracking.set_alias(name, version, "challenger")
    if decision.promote:
        tracking.set_alias(name, version, "champion")          # the commit point
    return RetrainResult(outcome, EXIT_OK, decision.reasons, **base, run_id=run_id,
                         candidate_version=version, champion_before=champion_before,
                         champion_after=champion_after, candidate=cand_m, champion=champ_m,
                         drift=drift, drift_alerts=tuple(alerts), warnings=tuple(warnings), rows=rows)


# ---------------------------------------------------------------- output
def _v(version: int | None) -> str:
    return "none" if version is None else f"v{version}"


def _m(metrics: dict | None) -> str:
    if not metrics:
        return "none"
    parts = [f"{k.upper()} {metrics[k]:.4f}" for k in ("auprc", "auroc") if metrics.get(k) is not None]
    parts.append(f"FPR {metrics['fpr']:.4f}" if metrics.get("fpr") is not None else "FPR n/a")
    if metrics.get("score_psi") is not None:
        parts.append(f"score PSI {metrics['score_psi']:.3f}")
    return ", ".join(parts)


def format_result(r: RetrainResult, quiet: bool = False) -> list[str]:
    """Human-readable summary; the first line is the machine-greppable decision line."""
    lines = [f"decision={r.decision} model={r.name} candidate={_v(r.candidate_version)} "
             f"champion={_v(r.champion_after)} exit={r.exit_code} run={r.run_id}"]
    if quiet:
        return lines
    lines += [f"  reason: {reason}" for reason in r.reasons]
    lines.append(f"  window: {len(r.window)} partition(s) {r.window[0]} .. {r.window[-1]} "
                 f"(key {r.window_key[:12]})")
    if r.rows:
        lines.append(f"  rows: {r.rows['train']:,} train, {r.rows['holdout']:,} holdout "
                     f"({r.rows['holdout_rule']})")
    if r.candidate is not None:
        lines.append(f"  candidate {_v(r.candidate_version)}: {_m(r.candidate)}")
        lines.append(f"  champion {_v(r.champion_before)}: {_m(r.champion)}" if r.champion
                     else "  champion: none yet")
    if r.drift is not None:
        feat = r.drift[r.drift["kind"] != "score"]
        top = feat.iloc[0] if len(feat) else None
        score = r.drift.loc[r.drift["kind"] == "score", "psi"]
        lines.append("  drift: " + (f"max feature PSI {top['psi']:.3f} ({top['feature']})" if top is not None
                                    else "no profiled features")
                     + (f", score PSI {score.iloc[0]:.3f}" if len(score) else "")
                     + f"; alerts: {', '.join(r.drift_alerts) or 'none'}")
    lines += [f"  warning: {w}" for w in r.warnings]
    return lines


# ------------------------------------------------------------------- CLI
def _split_names(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(n.strip() for v in values for n in v.split(",") if n.strip())


@click.command("retrain", short_help="Retrain on recent dated partitions; promote if better.")
@click.argument("name")
@click.argument("data", nargs=-1, required=True)
@click.option("--days", type=click.IntRange(min=1), default=None,
              show_default=f"{DEFAULT_DAYS} unless --files is given",
              help="Window: the last N days of partitions (by file-name date).")
@click.option("--files", "last_files", type=click.IntRange(min=1), default=None,
              help="Window: the last N partitions instead of days.")
@click.option("--end-date", type=click.DateTime(["%Y-%m-%d"]), default=None,
              help="Newest partition date in the window (default: the newest present).")
@click.option("--label", default=None, metavar="COL", show_default="the champion's label column, if it had one",
              help="Label column (1 = anomaly): enables AUPRC/AUROC gates.")
@click.option("--exclude", multiple=True, help="Columns not to model (repeat or comma-separate).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Max training epochs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--target-fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=DEFAULT_TARGET_FPR, show_default=True, help="False-positive rate the threshold aims at.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=DEFAULT_TOLERANCE, show_default=True,
              help="How much lower the candidate's AUPRC/AUROC may be than the champion's.")
@click.option("--fpr-band", type=click.FloatRange(min=0), default=DEFAULT_FPR_BAND, show_default=True,
              help="Candidate FPR on held-out normals must lie within target-fpr +/- this.")
@click.option("--max-score-psi", type=click.FloatRange(min=0), default=DEFAULT_MAX_SCORE_PSI,
              show_default=True, help="Largest allowed PSI between the candidate's calibration and "
                                      "holdout scores.")
@click.option("--psi-alert", type=click.FloatRange(min=0), default=DEFAULT_ALERT, show_default=True,
              help="Drift report: PSI above this raises an alert (report only, not a gate).")
@click.option("--holdout-partitions", type=click.IntRange(min=1), default=1, show_default=True,
              help="Newest partitions held out for evaluation (never trained on).")
@click.option("--holdout-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Rows held out when the window has too few partitions.")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True,
              help="Experiment of the decision runs.")
@click.option("--lock-dir", type=click.Path(file_okay=False), default=None,
              help="Directory of <name>.lock (default: beside the SQLite store, mlruns/locks).")
@click.option("--wait/--no-wait", default=False, show_default=True,
              help="Wait for a running retrain to finish instead of exiting with code 3.")
@click.option("--wait-timeout", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="Seconds to wait for the lock with --wait.")
@click.option("--force", is_flag=True, help="Retrain even if this window was already processed.")
@shared_options              # -q (only the decision line), --debug, --tracking-uri, --threads, ...
@click.pass_context
def retrain_command(ctx: click.Context, name: str, data: tuple[str, ...], days: int | None,
                    last_files: int | None, end_date: dt.datetime | None, label: str | None,
                    exclude: tuple[str, ...], epochs: int | None, seed: int, target_fpr: float,
                    tolerance: float, fpr_band: float, max_score_psi: float, psi_alert: float,
                    holdout_partitions: int, holdout_fraction: float,
                    experiment: str, lock_dir: str | None, wait: bool, wait_timeout: float,
                    force: bool) -> None:
    """Retrain model NAME on a window of DATA (dated parquet partitions: files, dirs, globs).

    Trains a candidate, compares it with the champion on the newest partition, registers it
    as @challenger and moves @champion only when the gates pass. Exit codes: 0 promoted,
    kept or no-op; 1 internal error; 2 bad input (refused); 3 locked by another run.
    """
    state = ctx.ensure_object(State)         # the shared options, before or after `retrain`
    quiet, tracking_uri, threads = state.quiet, state.tracking_uri, state.threads
    muted = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    if quiet:
        for noisy in ("mlflow", "alembic", "pipelines", "anomaly_vae"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        with muted:
            result = run_retrain(
                name, list(data), days=days, files=last_files,
                end_date=end_date.date() if end_date else None, label=label,
                exclude=_split_names(exclude), epochs=epochs, seed=seed, target_fpr=target_fpr,
                tolerance=tolerance, fpr_band=fpr_band, max_score_psi=max_score_psi,
                psi_alert=psi_alert, holdout_partitions=holdout_partitions, holdout_fraction=holdout_fraction,
                tracking_uri=tracking_uri, experiment=experiment, lock_dir=lock_dir, wait=wait,
                wait_timeout=wait_timeout, threads=threads, force=force, device=state.device,
                precision=state.precision)
    except LockedError as exc:
        click.echo(f"Error: retrain '{name}' locked out: {exc}", err=True)
        ctx.exit(EXIT_LOCKED)
    except AnomalyVAEError as exc:
        click.echo(f"Error: retrain '{name}' refused: {exc}", err=True)
        ctx.exit(EXIT_BAD_INPUT)
    lines = format_result(result, quiet)
    if not quiet:
        from anomaly_vae.store import resolve_tracking_uri
        lines.append(f"  store: {resolve_tracking_uri(tracking_uri)[0]}")
    click.echo("\n".join(lines), err=result.exit_code != EXIT_OK)
    ctx.exit(result.exit_code)


retrain = retrain_command

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    retrain_command(prog_name="retrain")
