"""DPO stage: the loss by hand (with cDPO label smoothing), response-only log-probs, one forward for chosen and
rejected, a tiny-world run, exact resume, LoRA with the adapter-disabled reference, config validation, and
share_prompt (each prompt run once: the same log-probs, loss and gradients)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import (
    CONFIGS,
    assert_resume_bit_identical,
    load_safetensors_dir,
    load_stage,
    metric_series,
    read_metrics,
    rm_overrides,
    train_with_and_without,
)
from transformers import AutoModelForCausalLM

from rlhf.algorithms import dpo_loss
from rlhf.config import ConfigError, load_config
from rlhf.data.encoding import TruncationReport
from rlhf.models.loading import load_tokenizer
from rlhf.stages import dpo

DPO_YAML = str(CONFIGS / "tiny" / "dpo.yaml")


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def dpo_overrides(world: Path, out: Path, model: Path, **extra) -> dict:
    """Overrides for configs/tiny/dpo.yaml that point every path into tmp dirs."""
    data = world / "data"
    return {
        "output_dir": out,
        "model.name_or_path": model,
        "data.train.path": data / "comparisons.jsonl",
        "data.eval.path": data / "comparisons_eval.jsonl",
        "data.eval.max_rows": 16,
        "train.batch_size": 4,
        "train.micro_batch_size": 4,
        "train.eval_every": 0,
        "optim.warmup_steps": 2,
    } | {k.replace("__", "."): v for k, v in extra.items()}


# --------------------------------------------------------------------------------------------------
# The loss, by hand
# --------------------------------------------------------------------------------------------------

# policy / reference sequence log-probs of 3 (chosen, rejected) pairs
PC, PR = [-10.0, -4.0, -7.5], [-12.0, -3.0, -7.5]
RC, RR = [-11.0, -5.0, -6.0], [-11.5, -2.0, -8.0]


def test_dpo_loss_matches_hand_values():
    beta = 0.5
    t = [torch.tensor(v) for v in (PC, PR, RC, RR)]
    loss, chosen, rejected = dpo_loss(*t, beta=beta)
    # pair 0: chosen ratio -10 - -11 = 1, rejected ratio -12 - -11.5 = -0.5 -> logits 0.5 * 1.5 = 0.75
    # pair 1: (-4 + 5) - (-3 + 2) = 1 - (-1) = 2 -> 1.0 ; pair 2: (-7.5 + 6) - (-7.5 + 8) = -1.5 - 0.5 -> -1.0
    assert chosen.tolist() == pytest.approx([0.5, 0.5, -0.75])
    assert rejected.tolist() == pytest.approx([-0.25, -0.5, 0.25])
    assert loss.tolist() == pytest.approx([-logsig(0.75), -logsig(1.0), -logsig(-1.0)], rel=1e-6)
    assert loss.shape == (3,) and not chosen.requires_grad

    # cDPO: -(1 - eps) log σ(z) - eps log σ(-z)
    eps = 0.1
    smoothed, _, _ = dpo_loss(*t, beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * logsig(z) - eps * logsig(-z) for z in (0.75, 1.0, -1.0)]
    assert smoothed.tolist() == pytest.approx(expected, rel=1e-6)

    # the paper's starting point: policy == reference gives log 2 and zero rewards; gradient only via the policy
    pc = torch.tensor(PC, requires_grad=True)
    loss, chosen, rejected = dpo_loss(pc, torch.tensor(PC), torch.tensor(PC), torch.tensor(PC), beta=0.1)
    assert loss.tolist() == pytest.approx([math.log(2)] * 3)
    assert chosen.tolist() == rejected.tolist() == [0.0] * 3
    loss.sum().backward()
    assert pc.grad.tolist() == pytest.approx([-0.1 * 0.5] * 3)  # d/dx -log σ(β x) at 0 = -β/2

    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*t, beta=beta, label_smoothing=0.5)


# --------------------------------------------------------------------------------------------------
# Log-probs over response tokens only, one forward for chosen and rejected
# --------------------------------------------------------------------------------------------------


def _groups(tokenizer) -> list:
    def enc(text: str, eos: bool = False) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])

    p0, p1 = enc("Human: tell me about the cat . Assistant:"), enc("Human: a line . Assistant:")
    g0 = [
        (p0, enc(" the cat is happy .", True)),
        (p0, enc(" the dog .", True)),
        (p0, enc(" it is sad all day .", True)),
    ]
    g1 = [(p1, enc(" it is .", True)), (p1, enc(" the cow is big in the park .", True))]
    return [g0, g1]


def test_sequence_logps_sum_response_tokens_only(tiny_lm, tokenizer):
    model = tiny_lm
    groups = _groups(tokenizer)
    batch = dpo.collate_groups(groups, tokenizer.pad_token_id)
    assert batch["pair_index"].tolist() == [[0, 1], [0, 2], [1, 2], [3, 4]]
    assert batch["group_index"].tolist() == [0, 0, 0, 1]
    with torch.no_grad():
        got = dpo.sequence_logps(model, batch)
    expected = []
    for prompt, response in [pair for g in groups for pair in g]:  # each alone, unpadded, by hand
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        expected.append(sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1])))
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_one_policy_forward_per_micro_batch(tiny_lm, tokenizer):
    model = tiny_lm
    batch = dpo.collate_groups(_groups(tokenizer), tokenizer.pad_token_id)
    calls: list[int] = []
    handle = model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        # the policy as its own reference: the reference forward is the first call, the policy's the second
        loss_sum, stats = dpo.preference_loss(
            model, lambda m, b: dpo.sequence_logps(m, b), batch, beta=0.1, label_smoothing=0.0
        )
    finally:
        handle.remove()
    assert calls == [5, 5]  # 5 responses (3 + 2), chosen and rejected together, once each
    # policy == reference: every pair's loss is log 2, each of the 2 prompts weighs 1; ties count as half right
    assert loss_sum.item() == pytest.approx(2 * math.log(2), rel=1e-6)
    assert stats["accuracy"].item() == pytest.approx(2 * 0.5)
    assert stats["reward_margin"].item() == 0.0


# --------------------------------------------------------------------------------------------------
# Training on the tiny world
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dpo(tiny_world, tiny_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    cfg = load_stage(
        "dpo",
        "dpo.yaml",
        dpo_overrides(
            tiny_world,
            out,
            tiny_sft,
            train__max_steps=30,
            train__batch_size=16,
            train__micro_batch_size=16,
            train__eval_every=10,
            data__eval__max_rows=64,
            logging__every=5,
            logging__num_samples=2,
        ),
    )
    return dpo.train(cfg)


def test_dpo_training_loss_falls_and_accuracy_rises(tiny_dpo, tiny_sft):
    from accelerate import Accelerator

    rows = read_metrics(tiny_dpo.parent)
    losses = [v for _, v in metric_series(rows, "train/loss")]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=0.05)  # the first steps start from policy == reference
    assert losses[-1] < losses[0] - 0.03, losses
    acc, eval_loss = metric_series(rows, "eval/accuracy"), metric_series(rows, "eval/loss")
    assert [s for s, _ in acc] == [10, 20, 30]
    assert eval_loss[-1][1] < eval_loss[0][1] < math.log(2), eval_loss

    # the start: the SFT policy judged against itself (every implicit reward 0) on the same held-out rows
    cfg = load_config("dpo", tiny_dpo.parent / "config.yaml")
    tokenizer = load_tokenizer(str(tiny_sft))
    groups = dpo.load_groups(tokenizer, cfg, cfg.data.eval, TruncationReport())
    sft_model = AutoModelForCausalLM.from_pretrained(tiny_sft)
    start = dpo.evaluate_groups(
        sft_model, lambda m, b: dpo.sequence_logps(m, b), groups, cfg, tokenizer.pad_token_id, Accelerator(cpu=True)
    )
    assert start["eval/accuracy"] == 0.5 and start["eval/loss"] == pytest.approx(math.log(2))
    assert all(a > start["eval/accuracy"] + 0.05 for _, a in acc), acc  # the gold ordering, learnt from noisy labels

    for key in ("train/accuracy", "train/reward_margin", "train/chosen_reward", "train/rejected_reward"):
        assert metric_series(rows, key), key
    assert metric_series(rows, "train/reward_margin")[-1][1] > 0
    assert (tiny_dpo.parent / "config.yaml").is_file() and (tiny_dpo / "rlhf_config.yaml").is_file()


def test_dpo_logs_samples_from_rendered_held_out_prompts(tiny_dpo):
    logged = [json.loads(line) for line in (tiny_dpo.parent / "samples.jsonl").read_text().splitlines()]
    assert len(logged) == 2 * 3  # two prompts at each of the 3 evaluations (steps 10, 20, 30)
    assert all(r["prompt"].startswith("Human:") and r["prompt"].endswith("Assistant:") for r in logged)


def test_dpo_final_loads_with_auto_class(tiny_dpo, tiny_sft):
    model = AutoModelForCausalLM.from_pretrained(tiny_dpo).eval()
    tokenizer = load_tokenizer(str(tiny_dpo))
    ids = tokenizer("Human: write a short happy sentence about the cat . Assistant:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    trained, sft_weights = load_safetensors_dir(tiny_dpo), load_safetensors_dir(tiny_sft)
    assert trained.keys() == sft_weights.keys()
    assert any(not torch.equal(trained[k], sft_weights[k]) for k in trained)


@pytest.mark.parametrize("packing", [False, True])
def test_dpo_resume_bit_identical(tiny_world, tiny_sft, tmp_path, packing):
    base = dpo_overrides(tiny_world, tmp_path, tiny_sft, data__packing=packing)
    assert_resume_bit_identical("dpo", "dpo.yaml", dpo.train, base, tmp_path)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_dpo_lora_with_adapter_disabled_reference(tiny_world, tiny_sft, tmp_path, share_prompt):
    cfg = load_stage(
        "dpo",
        "dpo.yaml",
        dpo_overrides(
            tiny_world,
            tmp_path,
            tiny_sft,
            reference="disable_adapter",
            share_prompt=share_prompt,
            model__lora__enabled=True,
            model__lora__target_modules=["q_proj", "v_proj"],
            model__lora__r=4,
            model__lora__alpha=8,
            train__max_steps=6,
            logging__every=1,
            optim__lr=1e-2,
        ),
    )
    final = dpo.train(cfg)
    rows = read_metrics(tmp_path)
    # step 1: the adapter starts at zero, so the policy is exactly its own adapter-disabled reference
    first = next(r for r in rows if r["step"] == 1)
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["train/reward_margin"] == 0.0 and first["train/accuracy"] == 0.5
    margins = [v for _, v in metric_series(rows, "train/reward_margin")]
    assert any(m != 0.0 for m in margins[1:]), margins
    # final/ is merged full weights (merge_on_save), loadable as a plain causal LM, and not the SFT weights
    assert not (final / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(final)
    trained, sft_weights = load_safetensors_dir(final), load_safetensors_dir(tiny_sft)
    assert not torch.equal(
        trained["model.layers.0.self_attn.q_proj.weight"], sft_weights["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(trained["model.layers.0.mlp.up_proj.weight"], sft_weights["model.layers.0.mlp.up_proj.weight"])


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def test_shipped_dpo_yaml_and_defaults():
    cfg = load_config("dpo", DPO_YAML)
    assert cfg.output_dir == "runs/tiny/dpo" and cfg.model.name_or_path == "runs/tiny/sft/final"
    assert cfg.data.train.path.endswith("comparisons.jsonl")
    defaults = load_config("dpo")
    assert defaults.beta == 0.1 and defaults.loss.label_smoothing == 0.0 and defaults.reference == "copy"


@pytest.mark.parametrize(
    "override, words",
    [
        ("reference=disable_adapter", ["reference: disable_adapter", "model.lora.enabled"]),
        ("reference=frozen", ["reference", "copy", "disable_adapter"]),
        ("loss.label_smoothing=0.5", ["loss.label_smoothing", "[0, 0.5)"]),
        ("beta=0", ["beta", "> 0"]),
        ("betta=0.2", ["did you mean 'beta'"]),
    ],
)
def test_dpo_config_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("dpo", DPO_YAML, [override])
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "dpo.yaml" in str(e.value)


def test_disable_adapter_refuses_a_peft_adapter_dir(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    cfg = load_config(
        "dpo", DPO_YAML, [f"model.name_or_path={tmp_path}", "reference=disable_adapter", "model.lora.enabled=true"]
    )
    with pytest.raises(ConfigError, match="peft adapter"):
        dpo.check_adapter_reference(cfg)


def test_cli_dry_run(tiny_world, tiny_sft, tmp_path, capsys):
    from rlhf.cli import main

    sets = [f"output_dir={tmp_path / 'dpo'}", f"model.name_or_path={tiny_sft}"]
    sets += [f"data.train.path={tiny_world / 'data' / 'comparisons.jsonl'}", "data.eval.path="]
    assert main(["dpo", "--config", DPO_YAML, "--dry-run"] + [a for s in sets for a in ("--set", s)]) == 0
    assert "config OK, paths OK" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# share_prompt: each prompt run once, its responses on its KV cache
# --------------------------------------------------------------------------------------------------


def _mixed_groups(tokenizer) -> list:
    """_groups plus a group whose two prompts differ (as truncation can leave them): shared only where ids match."""
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tokenizer.eos_token_id]
    p2 = enc("Human: the cow and the park . Assistant:")
    return _groups(tokenizer) + [[(p2, enc(" big .") + eos), (p2[2:], enc(" the cow .") + eos)]]


def test_shared_prompt_gives_the_full_log_probs_loss_and_gradients(tiny_lm, tokenizer):
    groups = _mixed_groups(tokenizer)
    full = dpo.collate_groups(groups, tokenizer.pad_token_id)
    shared = dpo.collate_groups(groups, tokenizer.pad_token_id, share_prompt=True)
    # 7 responses of 4 distinct prompts (the last group's two prompts differ), each episode pointing at its own
    assert shared["prompt_owner"].tolist() == [0, 0, 0, 1, 1, 2, 3]
    assert shared["prompt_first"].tolist() == [0, 3, 5, 6]
    assert torch.equal(shared["pair_index"], full["pair_index"])
    assert shared["attention_mask"].sum() == full["attention_mask"].sum()  # the same real tokens, laid out as PPO's

    calls: list[tuple] = []
    handle = tiny_lm.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            got = dpo.sequence_logps(tiny_lm, shared)
    finally:
        handle.remove()
    width = int(shared["prompt_width"])
    assert calls == [(4, width), (7, shared["input_ids"].shape[1] - width)]  # the 4 prompts once, then 7 responses
    with torch.no_grad():
        expected = dpo.sequence_logps(tiny_lm, full)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # the loss and every parameter's gradient, against a reference that differs from the policy
    reference = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    grads = []
    for batch in (full, shared):
        tiny_lm.zero_grad()
        loss, _ = dpo.preference_loss(
            tiny_lm, lambda m, b: dpo.sequence_logps(reference, b), batch, beta=0.1, label_smoothing=0.0
        )
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in tiny_lm.parameters()]))
    (loss_full, grad_full), (loss_shared, grad_shared) = grads
    torch.testing.assert_close(loss_shared, loss_full, rtol=1e-5, atol=1e-6)
    assert loss_full.item() != pytest.approx(3 * math.log(2), abs=1e-3)  # the reference differs: not a tie
    for g_full, g_shared in zip(grad_full, grad_shared):
        torch.testing.assert_close(g_shared, g_full, rtol=1e-4, atol=1e-7)


def test_share_prompt_without_a_repeated_prompt_collates_as_before(tokenizer):
    groups = [[g[0]] for g in _groups(tokenizer)]  # one response per prompt: nothing to share
    shared = dpo.collate_groups(groups, tokenizer.pad_token_id, share_prompt=True)
    full = dpo.collate_groups(groups, tokenizer.pad_token_id)
    assert shared.keys() == full.keys() and all(torch.equal(shared[k], full[k]) for k in full)


def test_shared_prompt_dpo_run_follows_the_full_one(tiny_world, tiny_sft, tmp_path, monkeypatch):
    overrides = dpo_overrides(tiny_world, tmp_path, tiny_sft, train__max_steps=4, logging__every=1, optim__lr=1e-3)
    counted = (dpo, "shared_response_logprobs")
    finals, losses, calls = train_with_and_without(
        "dpo", "dpo.yaml", dpo.train, overrides, "share_prompt", tmp_path, monkeypatch, counted
    )
    assert calls == [0, 4 * 2]  # the shared run only: each step's policy and reference forwards
    assert len(losses[0]) == 4 and losses[0][-1] != losses[0][0]  # it trained
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    moved = max((finals[0][k] - load_safetensors_dir(tiny_sft)[k]).abs().max().item() for k in finals[0])
    apart = max((finals[0][k] - finals[1][k]).abs().max().item() for k in finals[0])
    assert moved > 1e-3 and apart < 1e-3 * moved, (moved, apart)


@pytest.mark.parametrize("stage", ["dpo", "rm"])
@pytest.mark.parametrize(
    "clash", [{"data__packing": True}, {"model__gradient_checkpointing": True}, {"train__compile": True}]
)
def test_share_prompt_refuses_what_cannot_keep_the_cache(tiny_world, tiny_sft, tmp_path, clash, stage):
    key = next(iter(clash)).replace("__", ".")
    overrides = dpo_overrides if stage == "dpo" else rm_overrides
    with pytest.raises(ConfigError, match=f"share_prompt.*{key}"):
        load_stage(stage, f"{stage}.yaml", overrides(tiny_world, tmp_path, tiny_sft, share_prompt=True, **clash))
