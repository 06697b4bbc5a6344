"""`python -m anomaly_vae.cli`."""
from . import run

run()
