"""Training machinery: the train state, the compiled steps over a mesh, the loop, what a
NaN or a signal does. No TensorFlow, seqio or grain: batches arrive as NumPy arrays."""
