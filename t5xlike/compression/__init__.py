"""Making a trained model smaller: activation-based importance (`importance`) and
structured pruning of the parameter tree (`pruning`), behind `python -m t5xlike.prune`."""
