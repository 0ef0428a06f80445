"""Data: tfds builders, the synthetic pedestrian set, tokenizer, text augmentation, tf.data pipelines."""
