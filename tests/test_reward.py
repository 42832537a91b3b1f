"""Reward model: the K-way loss by hand, padding-side invariance, one forward per response, training, exact resume,
share_prompt (each prompt run once: the same scores, loss and gradients)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    assert_resume_bit_identical,
    load_stage,
    metric_series,
    read_metrics,
    rm_overrides,
    train_with_and_without,
)
from transformers import AutoModelForSequenceClassification

from rlhf.config import ModelConfig
from rlhf.data.batching import pad
from rlhf.models.forwards import backbone
from rlhf.models.heads import TokenValueModel, reward_scores
from rlhf.models.loading import load_reward_model, load_tokenizer
from rlhf.stages import reward_model as reward


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# groups of token ids, best first: K = 3 then K = 2 (contents don't matter when the scores are stubbed)
GROUPS = [[[5, 6, 7], [5, 6], [5, 8, 9, 10]], [[11, 12], [11, 13, 14]]]
SCORES = torch.tensor([1.5, -0.3, 0.2, 0.4, 0.9])  # rows in collate order: g0 (3 responses), g1 (2)


@pytest.fixture
def stub_scores(monkeypatch):
    calls = []

    def fake(model, input_ids, attention_mask, normalized=True):
        calls.append((input_ids.shape, normalized))
        assert input_ids.shape[0] == len(SCORES)
        return SCORES.clone()

    monkeypatch.setattr(reward, "reward_scores", fake)
    return calls


def hand_loss(scores: list[float], groups: list[list], margin_coef: float = 0.0) -> float:
    """Sum over groups of -1/C(K,2) Σ_{i<j} log σ(r_i - r_j - margin_coef (j - i)) (rows best first)."""
    total, base = 0.0, 0
    for group in groups:
        k = len(group)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        assert len(pairs) == math.comb(k, 2)
        total += -sum(logsig(scores[base + i] - scores[base + j] - margin_coef * (j - i)) for i, j in pairs) / len(
            pairs
        )
        base += k
    return total


def test_collate_groups_lists_every_pair():
    batch = reward.collate_groups(GROUPS, pad_token_id=0, margin_coef=0.0)
    assert batch["input_ids"].shape == (5, 4)
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 4, 2, 3]
    assert batch["pair_index"].tolist() == [[0, 1], [0, 2], [1, 2], [3, 4]]
    assert batch["group_index"].tolist() == [0, 0, 0, 1]
    assert batch["seq_group"].tolist() == [0, 0, 0, 1, 1]


def test_group_loss_matches_hand_formula(stub_scores):
    batch = reward.collate_groups(GROUPS, pad_token_id=0, margin_coef=0.0)
    loss_sum, stats = reward.group_loss(None, batch)
    assert stub_scores == [(batch["input_ids"].shape, False)]  # trained on raw (unnormalised) scores
    s = SCORES.tolist()
    assert loss_sum.item() == pytest.approx(hand_loss(s, GROUPS), rel=1e-6)
    # accuracy over the 4 pairs: (1.5>-0.3) (1.5>0.2) (-0.3<0.2 wrong) (0.4<0.9 wrong) -> 2/4, times 2 groups
    assert stats["accuracy"].item() == pytest.approx(0.5 * 2)
    margins = [s[0] - s[1], s[0] - s[2], s[1] - s[2], s[3] - s[4]]
    assert stats["margin"].item() == pytest.approx(sum(margins) / 4 * 2, rel=1e-6)


def test_group_loss_margin_and_centering(stub_scores):
    batch = reward.collate_groups(GROUPS, pad_token_id=0, margin_coef=0.5)
    loss_sum, _ = reward.group_loss(None, batch, center_coef=0.01)
    s = SCORES.tolist()
    centering = 0.01 * (sum(x * x for x in s[:3]) / 3 + sum(x * x for x in s[3:]) / 2)
    assert loss_sum.item() == pytest.approx(hand_loss(s, GROUPS, margin_coef=0.5) + centering, rel=1e-6)


def test_group_loss_pairwise_only(monkeypatch):
    monkeypatch.setattr(reward, "reward_scores", lambda *a, **k: torch.tensor([0.3, 0.1, -2.0, 1.0]))
    batch = reward.collate_groups([[[1, 2], [1, 3]], [[4], [5, 6]]], pad_token_id=0, margin_coef=0.0)
    loss_sum, _ = reward.group_loss(None, batch)
    assert loss_sum.item() == pytest.approx(-logsig(0.2) - logsig(-3.0), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# On a real (tiny) reward model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rm_model(tiny_sft):
    tokenizer = load_tokenizer(str(tiny_sft))
    torch.manual_seed(0)
    model = load_reward_model(ModelConfig(name_or_path=str(tiny_sft)), tokenizer, new_head=True)
    return model, tokenizer


def _sequences(tokenizer) -> list[list[int]]:
    texts = [
        "Human: tell me a short happy sentence about the cat . Assistant: the cat is happy .",
        "Human: write a long sad line about the dog . Assistant: the dog is sad in the park all day long .",
        "Human: give me a line . Assistant: it is .",
    ]
    return [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


def test_left_and_right_padding_score_identically(rm_model):
    model, tokenizer = rm_model
    seqs = _sequences(tokenizer)
    assert len({len(s) for s in seqs}) == 3
    masks = [[1] * len(s) for s in seqs]
    right = reward_scores(model, pad(seqs, tokenizer.pad_token_id, "right"), pad(masks, 0, "right"))
    left = reward_scores(model, pad(seqs, tokenizer.pad_token_id, "left"), pad(masks, 0, "left"))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    alone = torch.cat([reward_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    assert right.std() > 0  # a fresh head on a trained body: scores differ between sequences


def test_one_forward_per_response(rm_model):
    model, tokenizer = rm_model
    calls: list[int] = []

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(ids.shape[0])

    handle = backbone(model).register_forward_hook(hook, with_kwargs=True)
    try:
        seqs = _sequences(tokenizer)
        groups = [seqs + [seqs[0][:-3] + [tokenizer.eos_token_id]], seqs[1:]]  # K = 4 and K = 2
        batch = reward.collate_groups(groups, tokenizer.pad_token_id, 0.0)
        with torch.no_grad():
            loss_sum, _ = reward.group_loss(model, batch)
    finally:
        handle.remove()
    assert calls == [6]
    assert len(batch["pair_index"]) == math.comb(4, 2) + 1
    assert torch.isfinite(loss_sum)


# --------------------------------------------------------------------------------------------------
# Training on the tiny world
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rm(tiny_world, tiny_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    cfg = load_stage(
        "rm",
        "rm.yaml",
        rm_overrides(
            tiny_world,
            out,
            tiny_sft,
            train__max_steps=30,
            train__batch_size=16,
            train__micro_batch_size=16,
            train__eval_every=15,
            data__reference_max_rows=200,
            data__eval__max_rows=128,
            optim__warmup_steps=3,
        ),
    )
    return reward.train(cfg), cfg


def test_rm_training_logs_accuracy(tiny_rm):
    final, cfg = tiny_rm
    rows = read_metrics(final.parent)
    acc = metric_series(rows, "eval/accuracy")
    assert [s for s, _ in acc] == [15, 30]
    assert all(0.0 <= a <= 1.0 for _, a in acc)
    assert acc[-1][1] > 0.55, acc  # the judge's ranking is learnable well above chance in a few dozen steps
    assert metric_series(rows, "train/accuracy")
    assert (final.parent / "config.yaml").is_file()
    norm = json.loads((final / "reward_normalization.json").read_text())
    assert norm["reference_rows"] == 200


def test_rm_final_loads_with_auto_class(tiny_rm):
    final, cfg = tiny_rm
    tokenizer = load_tokenizer(str(final))
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    ours = load_reward_model(ModelConfig(name_or_path=str(final)), tokenizer)
    offset = hf.config.reward_offset
    assert isinstance(offset, float) and offset != 0.0

    seqs = reward.reference_sequences(tokenizer, cfg)[:12]
    ids = pad(seqs, tokenizer.pad_token_id, "right")
    mask = pad([[1] * len(s) for s in seqs], 0, "right")
    with torch.no_grad():
        raw = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(raw - offset, reward_scores(ours, ids, mask), atol=1e-5, rtol=0)
    torch.testing.assert_close(raw, reward_scores(ours, ids, mask, normalized=False), atol=1e-5, rtol=0)


def test_reference_completions_score_mean_zero(tiny_rm):
    final, cfg = tiny_rm
    tokenizer = load_tokenizer(str(final))
    model = load_reward_model(ModelConfig(name_or_path=str(final)), tokenizer)
    refs = reward.reference_sequences(tokenizer, cfg)
    assert len(refs) == 200
    raw = reward.score_sequences(model, refs, 64, tokenizer.pad_token_id, "cpu")
    normalized = raw.double() - model.config.reward_offset
    assert abs(normalized.mean().item()) < 1e-3
    assert raw.double().mean().item() == pytest.approx(model.config.reward_offset, abs=1e-3)


def test_rm_resume_bit_identical(tiny_world, tiny_sft, tmp_path):
    base = rm_overrides(tiny_world, tmp_path, tiny_sft, data__eval__max_rows=16, data__reference_max_rows=16)
    assert_resume_bit_identical("rm", "rm.yaml", reward.train, base, tmp_path)


# --------------------------------------------------------------------------------------------------
# share_prompt: each prompt run once, its K responses on its KV cache
# --------------------------------------------------------------------------------------------------


def _ranked_groups(tokenizer) -> list:
    """(prompt, response) groups, best first: K = 3 on one prompt, K = 2 whose two prompts differ (as truncation can
    leave them), K = 2 on one prompt."""
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tokenizer.eos_token_id]
    p0, p1, p2 = (
        enc("Human: tell me about the cat . Assistant:"),
        enc("Human: a line . Assistant:"),
        enc("Human: go ."),
    )
    return [
        [
            (p0, enc(" the cat is happy .") + eos),
            (p0, enc(" the dog .") + eos),
            (p0, enc(" it is sad all day .") + eos),
        ],
        [(p1, enc(" it is .") + eos), (p1[2:], enc(" the cow is big in the park .") + eos)],
        [(p2, enc(" the park .") + eos), (p2, enc(" sad .") + eos)],
    ]


def test_shared_prompt_gives_the_full_scores_loss_and_gradients(tiny_sft):
    tokenizer = load_tokenizer(str(tiny_sft))
    torch.manual_seed(0)
    hf_model = load_reward_model(ModelConfig(name_or_path=str(tiny_sft)), tokenizer, train=True, new_head=True)
    model = TokenValueModel(hf_model)
    groups = _ranked_groups(tokenizer)
    full = reward.collate_groups([[p + r for p, r in g] for g in groups], tokenizer.pad_token_id, 0.1)
    shared = reward.collate_shared_prompt(groups, tokenizer.pad_token_id, 0.1)
    assert shared["prompt_owner"].tolist() == [0, 0, 0, 1, 2, 3, 3] and shared["prompt_first"].tolist() == [0, 3, 4, 5]
    for key in ("pair_index", "group_index", "seq_group", "margin"):
        assert torch.equal(shared[key], full[key]), key

    calls: list[int] = []
    handle = backbone(hf_model).register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            got = reward.sequence_scores(model, shared)
    finally:
        handle.remove()
    assert calls == [4, 7]  # the 4 distinct prompts once, then the 7 responses on their caches
    with torch.no_grad():
        expected = reward.sequence_scores(model, full)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 0

    grads = []
    for batch in (full, shared):
        model.zero_grad()
        loss, _ = reward.group_loss(model, batch, center_coef=0.01)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_full, grad_full), (loss_shared, grad_shared) = grads
    torch.testing.assert_close(loss_shared, loss_full, rtol=1e-5, atol=1e-6)
    for g_full, g_shared in zip(grad_full, grad_shared):  # each tensor's gradient, to float rounding of its norm
        assert g_full.norm() > 0 and (g_shared - g_full).norm() < 1e-4 * g_full.norm()


def test_shared_prompt_rm_run_follows_the_full_one(tiny_world, tiny_sft, tmp_path, monkeypatch):
    overrides = rm_overrides(tiny_world, tmp_path, tiny_sft, train__max_steps=4, logging__every=1, optim__lr=1e-3)
    counted = (reward, "shared_token_values")
    finals, losses, calls = train_with_and_without(
        "rm", "rm.yaml", reward.train, overrides, "share_prompt", tmp_path, monkeypatch, counted
    )
    assert calls == [0, 4]  # the shared run only: one forward per step
    assert len(losses[0]) == 4 and losses[0][-1] != losses[0][0]  # it trained
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    apart = max((finals[0][k] - finals[1][k]).abs().max().item() for k in finals[0])
    moved = (finals[0]["score.weight"].abs().max()).item()  # a fresh head, trained from zero-mean init
    assert moved > 1e-3 and apart < 1e-4, (moved, apart)
