"""Stand-ins for the tokenizer quirks of real chat models, built locally: which token ends a response.

Qwen2.5 renders ChatML whose turns end with `<|im_end|>` while its `eos_token` is `<|endoftext|>` (also its pad);
Llama-3 ends turns with `<|eot_id|>`, has a BOS in its template and no pad token at all; Zephyr-style templates end
a turn with the EOS itself. The model must learn to stop where its template stops, so with a chat template the
turn-ending token becomes EOS in every stage.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf.batching import encode_prompts, encode_sft
from rlhf.config import FormatConfig
from rlhf.data import load_rows
from rlhf.models import chat_turn_end, load_tokenizer

WORDS = ["user", "assistant", "system", "hi", "hello", "name", "a", "fruit", ".", "an", "apple"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
ZEPHYR = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def stand_in(path: Path, specials: list[str], template: str, **tokens) -> Path:
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **tokens)
    tok.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in tokens.values()]})
    tok.chat_template = template
    tok.save_pretrained(str(path))
    return path


@pytest.fixture
def qwen(tmp_path) -> Path:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return stand_in(tmp_path / "qwen", specials, CHATML, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture
def llama3(tmp_path) -> Path:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return stand_in(tmp_path / "llama3", specials, LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


CHAT = FormatConfig(use_chat_template="auto", max_length=64, max_prompt_length=32)


def test_qwen_responses_end_with_im_end_and_pad_differs(qwen, tmp_path):
    tok = load_tokenizer(str(qwen), fmt=CHAT)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    rows = [{"prompt": "name a fruit .", "completion": "an apple .", "messages": []}]
    (example,) = encode_sft(tok, CHAT, _ds(rows, tmp_path), "rows", True, _report())
    tokens = tok.convert_ids_to_tokens(example["input_ids"])
    assert tokens[-6:] == ["<|im_start|>", "assistant", "an", "apple", ".", "<|im_end|>"]
    assert "<|endoftext|>" not in tokens
    # the rendered prompt is the template's generation prompt, identically in every stage
    (prompt,) = encode_prompts(tok, CHAT, rows)
    assert tok.convert_ids_to_tokens(prompt)[-2:] == ["<|im_start|>", "assistant"]
    # without the template, nothing changes: EOS stays the tokenizer's
    plain = load_tokenizer(str(qwen), fmt=FormatConfig(use_chat_template="never"))
    assert plain.eos_token == "<|endoftext|>"


def test_llama3_ends_turns_with_eot_and_gets_a_pad(llama3):
    tok = load_tokenizer(str(llama3), fmt=CHAT)
    assert tok.eos_token == "<|eot_id|>"
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    (prompt,) = encode_prompts(tok, CHAT, [{"prompt": "hi", "messages": []}])
    assert tok.convert_ids_to_tokens(prompt).count("<|begin_of_text|>") == 1  # the template's BOS, not a second


def test_a_template_that_ends_turns_with_eos_keeps_it(tmp_path):
    path = stand_in(tmp_path / "zephyr", ["</s>", "<|user|>", "<|assistant|>"], ZEPHYR, eos_token="</s>")
    tok = load_tokenizer(str(path), fmt=CHAT)
    assert chat_turn_end(tok) == "</s>" and tok.eos_token == "</s>"


def test_final_dir_keeps_the_turn_end_as_eos(qwen, tmp_path):
    tok = load_tokenizer(str(qwen), fmt=CHAT)
    tok.save_pretrained(str(tmp_path / "final"))
    assert load_tokenizer(str(tmp_path / "final")).eos_token == "<|im_end|>"  # generate/eval need no format


def _ds(rows, tmp_path):
    import json

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_rows(str(path), "sft")[0]


def _report():
    from rlhf.batching import TruncationReport

    return TruncationReport()


def test_a_bos_adding_tokenizer_gets_one_bos_per_sequence(tmp_path):
    """Llama-2 style: the tokenizer itself prepends <s>; with the plain prompt format the prompt carries it once and
    the completion (tokenized without special tokens) adds none."""
    from tokenizers import processors

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "Human:", "Assistant:"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(str(tmp_path / "llama2"))
    tok = load_tokenizer(str(tmp_path / "llama2"), fmt=FormatConfig(use_chat_template="auto"))
    rows = [{"prompt": "name a fruit .", "completion": "an apple .", "messages": []}]
    (example,) = encode_sft(tok, FormatConfig(), _ds(rows, tmp_path), "rows", True, _report())
    tokens = tok.convert_ids_to_tokens(example["input_ids"])
    assert tokens == ["<s>", "Human:", "name", "a", "fruit", ".", "Assistant:", "an", "apple", ".", "</s>"]
