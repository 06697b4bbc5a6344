"""Airflow DAGs for anomaly-vae: nightly scoring and the weekly retrain (Airflow 2.8+ or 3).

Copy or symlink this file into ``$AIRFLOW_HOME/dags``. Airflow is an optional extra
(``pip install -e '.[airflow]'``); both tasks shell out to the ``anomaly-vae`` CLI, so the
Airflow worker only needs the project's venv at ``ANOMALY_VAE_HOME``. Settings come from
environment variables on the worker:

  ANOMALY_VAE_HOME    project checkout with .venv, data/, scored/, mlruns/ (default /srv/anomaly-vae)
  ANOMALY_VAE_MODEL   registered model name (default payments)
  ANOMALY_VAE_RETRAIN_ARGS  extra retrain options (default: label/exclude for the demo data)

Windows are pinned to the run's data interval, so a re-run or backfill of the same logical
date retrains on the same files and is a no-op (the retrain's idempotency key).
"""
from __future__ import annotations

import os

import pendulum
from airflow import DAG

try:                                   # Airflow 3 moved the operator to the standard provider
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:                    # Airflow 2
    from airflow.operators.bash import BashOperator

HOME = os.environ.get("ANOMALY_VAE_HOME", "/srv/anomaly-vae")
MODEL = os.environ.get("ANOMALY_VAE_MODEL", "payments")
RETRAIN_ARGS = os.environ.get("ANOMALY_VAE_RETRAIN_ARGS",
                              "--label label --exclude customer_id,fraud_type")
CLI = f"{HOME}/.venv/bin/anomaly-vae"
ENV = {"MLFLOW_TRACKING_URI": f"sqlite:///{HOME}/mlruns/mlflow.db", "PATH": f"{HOME}/.venv/bin:/usr/bin:/bin"}
START = pendulum.datetime(2026, 1, 1, tz="UTC")
DEFAULTS = {"owner": "anomaly-vae", "retries": 2, "retry_delay": pendulum.duration(minutes=15)}

with DAG(
    dag_id="anomaly_vae_nightly_score",
    description="Score yesterday's partition with the champion model",
    schedule="30 1 * * *",
    start_date=START,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULTS,
    tags=["anomaly-vae"],
) as nightly_score:
    BashOperator(
        task_id="score_partition",
        # the daily interval [start, end) covers the partition dt=<start date>
        bash_command=(f"cd {HOME} && {CLI} -q score -m models:/{MODEL}@champion "
                      "data/dt={{ data_interval_start | ds }}.parquet -o scored/"),
        env=ENV,
        append_env=True,
    )

with DAG(
    dag_id="anomaly_vae_weekly_retrain",
    description="Retrain on the last 28 days; promote only if the gates pass",
    schedule="0 3 * * 0",
    start_date=START,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULTS,
    tags=["anomaly-vae"],
) as weekly_retrain:
    BashOperator(
        task_id="retrain",
        # exit 0 = promoted / kept / no-op; non-zero fails the task (3 = locked out -> retried)
        bash_command=(f"cd {HOME} && {CLI} -q retrain {MODEL} data/ --days 28 "
                      "--end-date {{ macros.ds_add(data_interval_end | ds, -1) }} "
                      f"{RETRAIN_ARGS} --wait --wait-timeout 3600"),
        env=ENV,
        append_env=True,
    )
