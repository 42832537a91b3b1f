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

from rlhf.config import FormatConfig
from rlhf.data.encoding import encode_prompts, encode_sft
from rlhf.data.sources import load_rows
from rlhf.models.loading import chat_turn_end, load_tokenizer

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
    from rlhf.data.encoding import TruncationReport

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


# --------------------------------------------------------------------------------------------------
# Every assistant turn of a chat row (data.train_on: all_assistant_turns)
# --------------------------------------------------------------------------------------------------

THREE_EXCHANGES = {
    "messages": [
        {"role": "system", "content": "a fruit ."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello ."},
        {"role": "user", "content": "name a fruit ."},
        {"role": "assistant", "content": "an apple ."},
        {"role": "user", "content": "name a fruit"},
        {"role": "assistant", "content": "a apple"},
    ]
}
# what each assistant turn must learn: its content and the turn's end, nothing of the other roles
SPANS = [["hello", "."], ["an", "apple", "."], ["a", "apple"]]


def _learnt_spans(tok, example) -> list[list[str]]:
    """The labelled tokens as runs of consecutive positions."""
    runs, run = [], []
    for token, label in zip(tok.convert_ids_to_tokens(example["input_ids"]), example["labels"]):
        if label != -100:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


@pytest.mark.parametrize("template", ["qwen", "llama3", "zephyr"])
def test_a_three_exchange_chat_row_learns_three_assistant_spans(template, qwen, llama3, tmp_path):
    path = {
        "qwen": qwen,
        "llama3": llama3,
        "zephyr": stand_in(
            tmp_path / "zephyr", ["</s>", "<|user|>", "<|assistant|>", "<|system|>"], ZEPHYR, eos_token="</s>"
        ),
    }[template]
    tok = load_tokenizer(str(path), fmt=CHAT)
    report = _report()
    (example,) = encode_sft(tok, CHAT, _ds([THREE_EXCHANGES], tmp_path), "rows", True, report, all_turns=True)
    assert _learnt_spans(tok, example) == [span + [tok.eos_token] for span in SPANS]
    assert report.assistant_turns == 3 and report.turns_fallback == 0
    assert example["labels"][-1] == tok.eos_token_id  # cut after the last turn's end
    # last_turn: the earlier answers are context
    (last,) = encode_sft(tok, CHAT, _ds([THREE_EXCHANGES], tmp_path), "rows", True, _report(), all_turns=False)
    assert _learnt_spans(tok, last) == [SPANS[-1] + [tok.eos_token]]


def test_a_template_that_rewrites_history_falls_back_to_the_last_turn(tmp_path):
    # renders an earlier assistant turn without its content once a later turn follows (as templates that drop
    # reasoning from history do): the turns cannot be located in the whole conversation's rendering
    forgetful = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}.{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    path = stand_in(tmp_path / "forgetful", specials, forgetful, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok = load_tokenizer(str(path), fmt=CHAT)
    report = _report()
    (example,) = encode_sft(tok, CHAT, _ds([THREE_EXCHANGES], tmp_path), "rows", True, report, all_turns=True)
    assert report.turns_fallback == 1 and report.assistant_turns == 0
    assert _learnt_spans(tok, example) == [SPANS[-1] + [tok.eos_token]]


def test_learning_every_turn_lowers_the_held_out_loss_of_earlier_turns(qwen, tmp_path):
    """SFT on 3-exchange chats (a greeting, then a question whose answer varies): trained on all assistant turns,
    the held-out loss on the non-final turns falls far below training on the last turn only, which never sees them
    as targets."""
    import json

    import torch
    from conftest import load_stage, tiny_llama_config
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from rlhf.data.encoding import encode_conversation
    from rlhf.stages import sft

    tok = load_tokenizer(str(qwen), fmt=CHAT)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tok), tok.pad_token_id)).save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    rows = [
        {"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello ."},
            {"role": "user", "content": "name"}, {"role": "assistant", "content": "a name ."},
            {"role": "user", "content": "name a fruit ."}, {"role": "assistant", "content": answer},
        ]}
        for answer in ("an apple .", "a apple .", "apple .", "an apple") * 8
    ]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for train_on in ("all_assistant_turns", "last_turn"):
        out = tmp_path / train_on
        cfg = load_stage(
            "sft",
            "sft.yaml",
            {
                "output_dir": out, "model.name_or_path": tmp_path / "base", "data.train.path": tmp_path / "chat.jsonl",
                "data.eval.path": "", "data.pretrain_mix.path": "", "data.pretrain_mix_ratio": 0,
                "data.train_on": train_on, "data.format.use_chat_template": "auto", "data.format.max_length": 64,
                "train.batch_size": 8, "train.micro_batch_size": 8, "train.max_steps": 60, "train.eval_every": 0,
                "optim.lr": 3e-3, "optim.warmup_steps": 0, "logging.num_samples": 0,
            },
        )  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(str(sft.train(cfg))).eval()
        # held out: the non-final turns (the first two labelled spans) of a fresh conversation
        row = dict(rows[0], prompt="", completion="an apple .", messages=rows[0]["messages"][:-1])
        example = encode_conversation(tok, CHAT, row, "held-out", 0, _report())
        ids = torch.tensor([example["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        labels = example["labels"][1:]
        learnt = [t for t, x in enumerate(labels) if x != -100]
        final_start = max(t for t in learnt if t == 0 or labels[t - 1] == -100)
        earlier = [t for t in learnt if t < final_start]
        losses[train_on] = -sum(logp[t, labels[t]].item() for t in earlier) / len(earlier)
    print("held-out loss on earlier turns", losses)
    assert losses["all_assistant_turns"] < 0.5 * losses["last_turn"], losses
