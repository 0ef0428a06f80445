"""Data: datasets (tfds builders, the synthetic set, preparing and reading them), text, images, the inputs.

prepare.py builds and reads a dataset; samplers.py orders the training pairs; train_input.py (tf.data) and
eval_input.py (numpy/PIL) turn a split into batches.
"""
