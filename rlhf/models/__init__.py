"""Models: loading tokenizers, causal LMs and reward/value models (one, or an ensemble's members; LoRA, dropout off)
(`loading`), the attention kernel they run (`attention`), the forwards every stage uses: logits, response log-probs,
token values (`forwards`), the scalar head, the trained critic and reward scores (`heads`), the same forwards with a
group's prompt run once (`shared_prompt`), the probe that packed rows stay apart (`packing`), and half-precision
storage of frozen weights (`precision`)."""
