"""Flax modules: CLIP dual encoder, restoration decoder, the UIT model, weight conversion."""
