"""uit_jax: text-to-image person retrieval with UIT (text-guided image restoration) in JAX/Flax."""

__version__ = "0.1.0"
