"""`python -m anomaly_vae.cli`."""
from . import main

main()
