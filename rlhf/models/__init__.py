"""Models: loading causal LMs, reward/value models and tokenizers (LoRA included), the scalar-head wrapper, the
forwards every stage uses (log-probs, values, reward scores, with a group's prompt run once), and precision."""
