"""Scheduled jobs around anomaly-vae: the retrain pipeline (`pipelines.retrain`) and its helpers.

Scheduling examples (cron, systemd, Airflow) and the runbook live beside this file; see
pipelines/README.md.
"""
