"""ICM-LoRA: In-Context Meta LoRA Generation as a DVC + MLflow + Accelerate pipeline."""

__version__ = "0.1.0"
