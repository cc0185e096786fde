"""Experiment trackers beside `metrics/` and TensorBoard: Weights & Biases, MLflow.

`tracker` holds the interface and the gin selection, `gin_params` the operative gin as
flat parameters, `wandb_tracker` and `mlflow_tracker` the two writers; a tracker's
library is imported only when a gin file selects it (README: "Experiment trackers").
"""
