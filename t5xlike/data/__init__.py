"""Data: seqio tasks turned into NumPy batches for the trainer.

This package (and `t5xlike.tasks`) is where TensorFlow and seqio are imported; the
core of t5xlike never imports them.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
