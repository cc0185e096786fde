"""Checkpoint conversion between t5xlike and other formats (`python -m t5xlike.convert`).

One module per format: `t5x_format` (T5X msgpack + TensorStore and orbax
checkpoints), `hf_t5` and `hf_llama` (Hugging Face `transformers`
directories), `hf_weights` (reading and writing their weight files),
`hf_names` (the parameter-name maps), `param_trees` (flat / nested / scanned
parameter trees in NumPy) and `output_dir` (the t5xlike output directory:
checkpoint + `model.gin`). Nothing here imports torch or TensorFlow.
"""
