"""Detection data: the Florence JSONL format, the synthetic generator, importers, the prepare stage."""
