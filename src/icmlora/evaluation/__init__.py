"""Evaluation: detection metrics for base, trained, generated and baseline adapters."""
