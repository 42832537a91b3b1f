"""SFT stage: the masked loss by hand, training integration, exact resume, LoRA and the pretraining mix."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    assert_resume_bit_identical,
    load_safetensors_dir,
    load_stage,
    metric_series,
    read_metrics,
    sft_overrides,
)
from datasets import Dataset
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.config import FormatConfig
from rlhf.data.batching import collate_lm
from rlhf.data.encoding import TruncationReport, encode_sft
from rlhf.stages import sft

ROWS = [
    {"prompt": "tell me a short happy sentence about the cat .", "completion": "the cat is happy ."},
    {
        "prompt": "write a long sad line about the dog in the park .",
        "completion": "the dog is sad in the park all day .",
    },
]


def _encode(tokenizer, mask_prompt: bool):
    fmt = FormatConfig(max_length=64, max_prompt_length=32)
    report = TruncationReport()
    examples = encode_sft(tokenizer, fmt, Dataset.from_list(ROWS), "rows", mask_prompt, report)
    assert report.rows == 2 and report.dropped == 0
    return examples


def _manual_loss(model, examples, prompt_lengths: list[int] | None) -> float:
    """Sum over rows (each forwarded alone, unpadded) of -log p(token_t | tokens_<t) at the loss positions."""
    total = 0.0
    for e, plen in zip(examples, prompt_lengths or [1] * len(examples)):
        ids = torch.tensor([e["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        for t in range(max(plen, 1), len(e["input_ids"])):
            total -= logp[t - 1, e["input_ids"][t]].item()
    return total


def _prompt_lengths(examples) -> list[int]:
    return [sum(1 for x in e["labels"] if x == -100) for e in examples]


def test_encode_sft_masks_prompt_and_ends_with_eos(tokenizer):
    examples = _encode(tokenizer, mask_prompt=True)
    for e, plen in zip(examples, _prompt_lengths(examples)):
        assert plen > 0
        assert e["labels"][:plen] == [-100] * plen
        assert e["labels"][plen:] == e["input_ids"][plen:]
        assert e["input_ids"][-1] == tokenizer.eos_token_id
    unmasked = _encode(tokenizer, mask_prompt=False)
    assert all(e["labels"] == e["input_ids"] for e in unmasked)


def test_masked_loss_matches_hand_computation(tokenizer, tiny_lm):
    examples = _encode(tokenizer, mask_prompt=True)
    assert len(examples[0]["input_ids"]) != len(examples[1]["input_ids"])  # padding is exercised
    batch = collate_lm(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        loss_sum, stats = sft.sft_loss(tiny_lm, batch)
    plens = _prompt_lengths(examples)
    expected = _manual_loss(tiny_lm, examples, plens)
    assert loss_sum.item() == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert stats["loss"].item() == pytest.approx(expected, rel=1e-5, abs=1e-4)
    completion_tokens = sum(len(e["input_ids"]) - p for e, p in zip(examples, plens))
    assert int(sft.token_units(batch)) == completion_tokens

    # mask_prompt: false puts the prompt tokens back in (every token after the first)
    full = _encode(tokenizer, mask_prompt=False)
    full_batch = collate_lm(full, tokenizer.pad_token_id)
    with torch.no_grad():
        full_sum, _ = sft.sft_loss(tiny_lm, full_batch)
    assert full_sum.item() == pytest.approx(_manual_loss(tiny_lm, full, None), rel=1e-5, abs=1e-4)
    assert full_sum.item() > loss_sum.item()
    assert int(sft.token_units(full_batch)) == sum(len(e["input_ids"]) - 1 for e in full)


class FixedLogits(nn.Module):
    """A stand-in causal LM returning given logits, to see which positions the loss reads."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return type("Out", (), {"logits": self.logits})()


def test_prompt_and_padding_logits_do_not_affect_masked_loss(tokenizer):
    examples = _encode(tokenizer, mask_prompt=True)
    batch = collate_lm(examples, tokenizer.pad_token_id)
    b, t = batch["input_ids"].shape
    logits = torch.randn(b, t, len(tokenizer), generator=torch.Generator().manual_seed(0))
    base, _ = sft.sft_loss(FixedLogits(logits), batch)
    plens = _prompt_lengths(examples)
    lengths = [len(e["input_ids"]) for e in examples]

    moved = logits.clone()
    for row, (plen, n) in enumerate(zip(plens, lengths)):
        moved[row, : plen - 1] += 5 * torch.randn(plen - 1, len(tokenizer))  # predict prompt tokens
        moved[row, n - 1 :] += 5 * torch.randn(t - n + 1, len(tokenizer))  # after EOS: predict padding
    same, _ = sft.sft_loss(FixedLogits(moved), batch)
    assert same.item() == pytest.approx(base.item(), abs=1e-5)

    hit = logits.clone()
    hit[0, plens[0] - 1] += 5 * torch.randn(len(tokenizer))  # predicts the first completion token
    changed, _ = sft.sft_loss(FixedLogits(hit), batch)
    assert changed.item() != pytest.approx(base.item(), abs=1e-3)


# --------------------------------------------------------------------------------------------------
# Integration on the tiny world
# --------------------------------------------------------------------------------------------------


def test_tiny_sft_run(tiny_sft):
    out = tiny_sft.parent
    rows = read_metrics(out)
    evals = metric_series(rows, "eval/loss")
    assert [s for s, _ in evals] == [10, 20, 30, 40]
    assert evals[0][1] > evals[-1][1], f"held-out loss did not fall: {evals}"
    assert all(math.isfinite(v) for _, v in metric_series(rows, "train/loss"))
    assert (out / "config.yaml").is_file()
    assert (tiny_sft / "rlhf_config.yaml").is_file()
    assert (out / "samples.jsonl").is_file()
    assert not list(out.glob("*.tmp"))
    # logged samples start from held-out prompts rendered as the model sees them (the prompt template here)
    logged = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert logged and all(r["prompt"].startswith("Human:") and r["prompt"].endswith("Assistant:") for r in logged)

    tokenizer = AutoTokenizer.from_pretrained(tiny_sft)
    model = AutoModelForCausalLM.from_pretrained(tiny_sft).eval()
    prompt = "Human: tell me a short happy sentence about the cat . Assistant:"
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = gen[0, ids["input_ids"].shape[1] :]
    assert new.numel() > 0
    assert tokenizer.decode(new, skip_special_tokens=True).strip()


def test_config_yaml_reloads(tiny_sft):
    from rlhf.config import load_config

    cfg = load_config("sft", tiny_sft.parent / "config.yaml")
    assert cfg.train.max_steps == 40 and cfg.output_dir == str(tiny_sft.parent)


def test_sft_resume_bit_identical(tiny_world, tiny_base, tmp_path):
    base = sft_overrides(tiny_world, tmp_path, tiny_base, data__pretrain_mix_ratio=0.25)
    assert_resume_bit_identical("sft", "sft.yaml", sft.train, base, tmp_path)


def test_lora_adapter_and_merge(tiny_world, tiny_sft, tmp_path):
    from peft import PeftModel

    base_weights = load_safetensors_dir(tiny_sft)
    lora = {
        "model.lora.enabled": True,
        "model.lora.target_modules": ["q_proj", "v_proj"],
        "model.lora.r": 4,
        "model.lora.alpha": 8,
        "train.max_steps": 4,
        "optim.lr": 1e-2,
    }

    adapter_final = sft.train(
        load_stage(
            "sft",
            "sft.yaml",
            sft_overrides(tiny_world, tmp_path / "adapter", tiny_sft) | lora | {"model.lora.merge_on_save": False},
        )
    )
    assert (adapter_final / "adapter_config.json").is_file()
    assert not (adapter_final / "model.safetensors").exists()
    adapter_config = json.loads((adapter_final / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}
    adapter = load_safetensors_dir(adapter_final)
    assert adapter and all("lora_" in k for k in adapter), sorted(adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_sft), adapter_final)
    frozen = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in peft_model.state_dict().items()
        if "lora_" not in k
    }
    assert frozen.keys() == base_weights.keys()
    for k, v in frozen.items():
        assert torch.equal(v, base_weights[k]), f"base weight {k} changed under LoRA"
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        with_adapter = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            without = peft_model(input_ids=ids).logits
    assert not torch.allclose(with_adapter, without)

    merged_final = sft.train(
        load_stage(
            "sft",
            "sft.yaml",
            sft_overrides(tiny_world, tmp_path / "merged", tiny_sft) | lora | {"model.lora.merge_on_save": True},
        )
    )
    assert not (merged_final / "adapter_config.json").exists()
    merged = load_safetensors_dir(merged_final)
    assert merged.keys() == base_weights.keys()
    changed = {k for k in merged if not torch.equal(merged[k], base_weights[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed), sorted(changed)
    model = AutoModelForCausalLM.from_pretrained(merged_final)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, with_adapter, atol=1e-4)  # same seed, same steps


def test_pretrain_mix_rows_in_batches(tiny_world, tiny_base, tmp_path, monkeypatch, capsys):
    seen: list[list[dict]] = []
    real = sft.collate_lm

    def spy(rows, pad_token_id):
        seen.append(rows)
        return real(rows, pad_token_id)

    monkeypatch.setattr(sft, "collate_lm", spy)
    cfg = load_stage(
        "sft",
        "sft.yaml",
        sft_overrides(
            tiny_world,
            tmp_path,
            tiny_base,
            data__pretrain_mix_ratio=0.25,
            data__eval__path="",  # no eval: every collate call is a training micro-batch
            train__max_steps=3,
        ),
    )
    sft.train(cfg)
    assert len(seen) == 3
    for rows in seen:
        assert len(rows) == 8
        # a pretraining row has loss on every token; an SFT row masks its prompt
        mix = [r for r in rows if r["labels"][0] != -100]
        assert len(mix) == 2 and all(r["labels"] == r["input_ids"] for r in mix)
    assert "2 pretraining rows per batch" in capsys.readouterr().out


def test_gradient_checkpointing_gives_the_same_step(tiny_world, tiny_base, tmp_path):
    """Recomputing activations in backward changes memory, not the math: same weights after 2 steps."""
    finals = []
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        mapping = sft_overrides(tiny_world, tmp_path / name, tiny_base, train__max_steps=2, checkpoint__every=0)
        finals.append(
            sft.train(load_stage("sft", "sft.yaml", mapping | {"model.gradient_checkpointing": checkpointing}))
        )
    plain, checkpointed = (load_safetensors_dir(f) for f in finals)
    for key in plain:
        torch.testing.assert_close(plain[key], checkpointed[key], atol=1e-6, rtol=0)
