"""The tiny world's word-level tokenizer and its tiny Llama config (both independent of the seed)."""

from __future__ import annotations

from pathlib import Path

from rlhf.tiny.grammar import SPECIAL_TOKENS, VOCAB


def word_level_tokenizer(words: list[str], model_max_length: int):
    """A word-level fast tokenizer: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, then ``words`` in order.

    No decoder is set: ``tokenizers`` then joins tokens with single spaces, which inverts the ``WhitespaceSplit``
    pre-tokenizer for single-space texts. No BOS/EOS is added on encode (no post-processor template).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
        # The default cleanup would glue " ." to the previous word and break decode(encode(text)) == text.
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def build_tokenizer(out_dir: str | Path):
    """Build the word-level tokenizer of the task (:data:`VOCAB` in sorted order after the special tokens), save it
    with ``save_pretrained`` and return it."""
    tokenizer = word_level_tokenizer(VOCAB, model_max_length=128)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_model_config(out_dir: str | Path, tokenizer):
    """Save and return the tiny ``LlamaConfig`` (~0.1M parameters) matching ``tokenizer``."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attention_dropout=0.0,
    )
    config.save_pretrained(str(out_dir))
    return config
