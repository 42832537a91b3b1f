"""Data: reading sources (json/jsonl/parquet files, saved `datasets` dirs, hub datasets) into normalised rows
(`sources`), encoding them with a tokenizer and a prompt format under a truncation policy (`encoding`), preference
rows as ranked groups (`preference`), and cutting token rows into batches: padding, collation, the deterministic
batch schedule, batches of like length (`batching`), and packing (`packing`)."""
