"""Inference with a trained model: decoding, prepacked prefill, batched prediction and
scoring, checkpoint loading, task evaluation with seqio metric functions, the JSONL
formats of `python -m t5xlike.infer`. No TensorFlow: task examples come from `t5xlike.data`."""
