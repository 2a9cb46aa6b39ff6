"""Training: tokenizer training, data pipeline."""
