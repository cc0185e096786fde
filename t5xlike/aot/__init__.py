"""Ahead-of-time compilation for machines that are not here: named TPU slices and GPU
nodes (`targets`), their compile-only devices, what the optimised HLO holds
(`hlo_stats`) and the per-chip report of a compiled train step (`step_report`)."""
