"""Conditional VAE that generates flattened LoRA parameter vectors from a task vector."""
