"""Data: reading sources (json/jsonl/parquet files, saved `datasets` dirs, hub datasets) into normalised rows,
encoding them with a tokenizer and a prompt format, and cutting them into batches (padding, packing, the
deterministic batch schedule, micro-batches grouped by length)."""
