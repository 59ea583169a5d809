"""Data: tokenizer, records, processor and input pipeline."""
