"""Packing (data.packing): best-fit bins, packed rows computing exactly what they compute alone, the same loss and
token count as unpacked, prompt masks per row, a guard against models whose attention would let rows mix, and
exact resume of a packed run."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import assert_resume_bit_identical, load_stage, metric_series, read_metrics, sft_overrides
from datasets import Dataset

from rlhf.config import FormatConfig
from rlhf.data import packing
from rlhf.data.batching import collate_lm
from rlhf.data.encoding import TruncationReport, encode_sft
from rlhf.data.packing import best_fit_decreasing, collate_packed, packed_micro_batches
from rlhf.models import packing as model_packing
from rlhf.models.forwards import causal_logits
from rlhf.models.packing import check_rows_independent
from rlhf.stages import sft

WORDS = "the cat dog is happy sad in park all day a short long line about tell me write".split()


def mixed_rows(tokenizer, n: int = 7, seed: int = 0) -> list[dict]:
    """SFT examples of mixed lengths (prompt-masked)."""
    rng = random.Random(seed)
    rows = [
        {
            "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))),
            "completion": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))),
        }
        for _ in range(n)
    ]
    fmt = FormatConfig(max_length=40, max_prompt_length=16)
    examples = encode_sft(tokenizer, fmt, Dataset.from_list(rows), "rows", True, TruncationReport())
    assert len({len(e["input_ids"]) for e in examples}) > 3
    return examples


def test_best_fit_decreasing_by_hand():
    # longest first: 9 -> new bin (room 1); 8 -> new (2); 7 -> new (3); 5 -> new (5); 3 -> the bin with room 3;
    # 2 -> the bin with room 2
    assert best_fit_decreasing([5, 9, 3, 7, 2, 8], 10) == [[1], [5, 4], [3, 2], [0]]
    assert best_fit_decreasing([12, 3], 10) == [[0], [1]]  # too long for any bin: one of its own
    assert best_fit_decreasing([], 10) == []


@pytest.mark.parametrize("seed", range(20))
def test_best_fit_decreasing_places_every_row_once_within_capacity(seed):
    rng = random.Random(seed)
    capacity = rng.randint(8, 64)
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 60))]
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # a bin is opened only when the row fits no open bin, so no two bins could have been one
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(a + b > capacity for j, a in enumerate(loads) for b in loads[j + 1 :])
    assert bins == best_fit_decreasing(lengths, capacity)  # deterministic


def test_packed_rows_give_the_unpacked_logits_loss_and_token_count(tokenizer, tiny_lm):
    examples = mixed_rows(tokenizer)
    padded = collate_lm(examples, tokenizer.pad_token_id)
    sequences = [examples[:3], examples[3:5], examples[5:]]
    packed = collate_packed(sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        alone = causal_logits(tiny_lm, padded["input_ids"], padded["attention_mask"])
        together = causal_logits(
            tiny_lm, packed["input_ids"], packed["attention_mask"], position_ids=packed["position_ids"]
        )
    i = 0
    for s, rows in enumerate(sequences):
        start = 0
        for e in rows:
            n = len(e["input_ids"])
            torch.testing.assert_close(together[s, start : start + n], alone[i, :n], rtol=1e-5, atol=1e-5)
            start, i = start + n, i + 1
    with torch.no_grad():
        loss_padded, _ = sft.sft_loss(tiny_lm, padded)
        loss_packed, _ = sft.sft_loss(tiny_lm, packed)
    assert loss_packed.item() == pytest.approx(loss_padded.item(), rel=1e-5)
    assert int(sft.token_units(packed)) == int(sft.token_units(padded))


def test_packed_labels_keep_each_rows_prompt_mask(tokenizer):
    examples = mixed_rows(tokenizer)
    packed = collate_packed([examples], tokenizer.pad_token_id)
    labels, start = packed["labels"][0].tolist(), 0
    for e in examples:
        n = len(e["input_ids"])
        # the row's own labels (prompt -100, completion = its ids), its first token never a target
        assert labels[start : start + n] == [-100] + e["labels"][1:]
        assert packed["position_ids"][0, start : start + n].tolist() == list(range(n))
        start += n


def test_no_packed_row_attends_to_another(tokenizer, tiny_lm):
    examples = mixed_rows(tokenizer)
    packed = collate_packed([examples], tokenizer.pad_token_id)
    changed = packed["input_ids"].clone()
    n0 = len(examples[0]["input_ids"])
    changed[0, :n0] = torch.randint(3, len(tokenizer), (n0,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = causal_logits(tiny_lm, packed["input_ids"], None, position_ids=packed["position_ids"])
        after = causal_logits(tiny_lm, changed, None, position_ids=packed["position_ids"])
    assert not torch.allclose(before[0, :n0], after[0, :n0])  # the perturbed row moved
    torch.testing.assert_close(before[0, n0:], after[0, n0:], rtol=0, atol=1e-6)  # no other row did


def test_micro_batches_hold_at_most_max_length_tokens_per_sequence(tokenizer):
    examples = mixed_rows(tokenizer, n=30)
    batches = packed_micro_batches(examples, max_length=40, micro_batch_size=2, pad_token_id=tokenizer.pad_token_id)
    assert all(b["input_ids"].shape[0] <= 2 and b["input_ids"].shape[1] <= 40 for b in batches)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == sum(len(e["input_ids"]) for e in examples)
    assert sum(b["input_ids"].numel() for b in batches) < sum(len(e["input_ids"]) for e in examples) * 1.5


def test_a_model_whose_rows_would_mix_is_refused(tiny_lm, monkeypatch):
    assert check_rows_independent(tiny_lm, tiny_lm.config.vocab_size, "cpu") < 1e-4

    def leaking(model, ids, attention_mask, last=0, position_ids=None):  # ignores the restarts: plain causal mask
        return causal_logits(model, ids, torch.ones_like(ids))

    monkeypatch.setattr(model_packing, "causal_logits", leaking)
    from rlhf.config import ConfigError

    with pytest.raises(ConfigError, match="data.packing"):
        check_rows_independent(tiny_lm, tiny_lm.config.vocab_size, "cpu")


def test_packed_sft_run_resumes_bit_identical(tiny_world, tiny_base, tmp_path):
    base = sft_overrides(tiny_world, tmp_path, tiny_base, data__packing=True, data__pretrain_mix_ratio=0.25)
    assert_resume_bit_identical("sft", "sft.yaml", sft.train, base, tmp_path)


def test_packed_and_unpacked_runs_take_the_same_first_step(tiny_world, tiny_base, tmp_path, monkeypatch):
    """Same rows (length grouping off on both), one step: the token-mean loss and the weights agree to rounding."""
    from conftest import load_safetensors_dir

    from rlhf.data import batching

    monkeypatch.setattr(batching.BatchSchedule, "__init__", _ungrouped_schedule_init)
    finals = {}
    for packed in (False, True):
        out = tmp_path / str(packed)
        cfg = load_stage(
            "sft",
            "sft.yaml",
            sft_overrides(tiny_world, out, tiny_base, data__packing=packed, train__max_steps=1, logging__every=1),
        )
        finals[packed] = load_safetensors_dir(sft.train(cfg))
        finals[f"loss{packed}"] = metric_series(read_metrics(out), "train/loss")[0][1]
    assert finals["lossTrue"] == pytest.approx(finals["lossFalse"], rel=1e-5)
    assert max((finals[True][k] - finals[False][k]).abs().max().item() for k in finals[True]) < 1e-5


_original_init = __import__("rlhf.data.batching", fromlist=["BatchSchedule"]).BatchSchedule.__init__


def _ungrouped_schedule_init(self, lengths, batch_size, seed, group_by_length=True, what=""):
    _original_init(self, lengths, batch_size, seed, group_by_length=False, what=what)


# --------------------------------------------------------------------------------------------------
# Reward model: responses packed, each score read at its last token
# --------------------------------------------------------------------------------------------------


def test_pack_rows_reads_each_rows_last_token():
    rows = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    batch = packing.pack_rows(rows, max_length=6, pad_token_id=0)
    flat = batch["input_ids"].reshape(-1)
    assert [int(flat[i]) for i in batch["last_index"]] == [r[-1] for r in rows]
    assert int(batch["attention_mask"].sum()) == sum(map(len, rows))


def test_packed_reward_groups_give_the_padded_scores_and_loss(tokenizer, tiny_value_model):
    from rlhf.stages import reward_model as reward

    examples = mixed_rows(tokenizer, n=9)
    groups = [[e["input_ids"] for e in examples[i : i + 3]] for i in range(0, 9, 3)]  # K = 3, mixed lengths
    padded = reward.collate_groups(groups, tokenizer.pad_token_id, margin_coef=0.1)
    packed = reward.collate_groups(groups, tokenizer.pad_token_id, margin_coef=0.1, pack_length=40)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer sequences than responses
    with torch.no_grad():
        torch.testing.assert_close(
            reward.sequence_scores(tiny_value_model, packed),
            reward.sequence_scores(tiny_value_model, padded),
            rtol=1e-5,
            atol=1e-5,
        )
        loss_packed, _ = reward.group_loss(tiny_value_model, packed, center_coef=0.01)
        loss_padded, _ = reward.group_loss(tiny_value_model, padded, center_coef=0.01)
    assert loss_packed.item() == pytest.approx(loss_padded.item(), rel=1e-5)
    model = tiny_value_model
    assert check_rows_independent(model, len(tokenizer), "cpu", lambda i, a, p: model(i, a, p)[..., None]) < 1e-4


def test_packed_rm_run_resumes_bit_identical(tiny_world, tiny_sft, tmp_path):
    from conftest import rm_overrides

    from rlhf.stages import reward_model as reward

    base = rm_overrides(
        tiny_world, tmp_path, tiny_sft, data__eval__max_rows=16, data__reference_max_rows=16, data__packing=True
    )
    assert_resume_bit_identical("rm", "rm.yaml", reward.train, base, tmp_path)


# --------------------------------------------------------------------------------------------------
# PPO: forwards cut to the columns a micro-batch's episodes use
# --------------------------------------------------------------------------------------------------


def small_rollout(tokenizer) -> Rollout:  # noqa: F821
    """4 episodes, prompts left-padded to 6 (widths 3, 5, 2, 4), responses right-padded to 7 (lengths 2, 5, 1, 3)."""
    from rlhf.data.batching import pad
    from rlhf.stages.ppo.rollout import Rollout

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tokenizer), (n,), generator=g).tolist() for n in (3, 5, 2, 4)]
    responses = [torch.randint(3, len(tokenizer), (n,), generator=g).tolist() for n in (2, 5, 1, 3)]
    pad_id = tokenizer.pad_token_id
    query_responses = torch.cat([pad(prompts, pad_id, side="left", width=6), pad(responses, pad_id, width=7)], 1)
    prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left", width=6)
    response_mask = pad([[1] * len(r) for r in responses], 0, width=7).bool()
    per_token = torch.randn(4, 7, generator=g)
    return Rollout(
        query_responses=query_responses,
        attention_mask=torch.cat([prompt_mask, response_mask.long()], 1),
        response_mask=response_mask,
        prompt_width=6,
        logprobs=per_token,
        ref_logprobs=per_token + 1,
        values=per_token + 2,
        scores=torch.arange(4.0),
        raw_scores=torch.arange(4.0),
        score_std=torch.zeros(4),
        ended=torch.ones(4, dtype=torch.bool),
        advantages=per_token + 3,
        returns=per_token + 4,
    )


def test_rollout_select_cuts_the_padding_every_row_has(tokenizer):
    from rlhf.stages.ppo.rollout import real_columns

    ro = small_rollout(tokenizer)
    assert real_columns(ro.attention_mask, ro.response_mask, 6) == (1, 5)  # widest prompt 5, longest response 5
    mb = ro.select(torch.tensor([0, 2]))  # prompts 3 and 2 wide, responses 2 and 1 long
    assert mb.prompt_width == 3 and mb.query_responses.shape == (2, 3 + 2)
    assert mb.response_mask.shape == mb.logprobs.shape == mb.advantages.shape == (2, 2)
    torch.testing.assert_close(mb.logprobs, ro.logprobs[[0, 2], :2])
    torch.testing.assert_close(mb.returns, ro.returns[[0, 2], :2])
    assert mb.query_responses[:, 3:].tolist() == ro.query_responses[[0, 2], 6:8].tolist()
    assert int(mb.attention_mask.sum()) == int(ro.attention_mask[[0, 2]].sum())  # no real token lost


def test_log_probs_and_values_of_a_cut_micro_batch_are_the_full_ones(tokenizer, tiny_lm, tiny_value_model):
    from rlhf.models.forwards import response_logprobs, response_values

    ro = small_rollout(tokenizer)
    idx = torch.tensor([0, 3])
    mb = ro.select(idx)
    with torch.no_grad():
        full = response_logprobs(tiny_lm, ro.query_responses[idx], ro.attention_mask[idx], 6, 1.0)
        cut = response_logprobs(tiny_lm, mb.query_responses, mb.attention_mask, mb.prompt_width, 1.0)
        full_v = response_values(tiny_value_model, ro.query_responses[idx], ro.attention_mask[idx], 6)
        cut_v = response_values(tiny_value_model, mb.query_responses, mb.attention_mask, mb.prompt_width)
    mask = mb.response_mask
    width = mask.shape[1]
    torch.testing.assert_close(cut[mask], full[:, :width][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cut_v[mask], full_v[:, :width][mask], rtol=1e-5, atol=1e-5)


def test_scoring_in_length_grouped_micro_batches_gives_every_episode_its_own_outputs(
    tiny_world, tiny_sft, tiny_rm, tmp_path
):
    """The rollout scores its episodes in micro-batches of like prompt and response length (here 4 of 4, out of
    episode order) and puts the outputs back: every episode's old and reference log-probs, values and score equal
    those of one micro-batch holding all 16 in order."""
    from conftest import ppo_config

    from rlhf.stages import ppo

    rollouts = {}
    for micro in (1, 8):  # scoring micro-batches of 4 x micro: 4 (grouped) and 32 (all 16 episodes, in order)
        trainer = ppo.PPOTrainer(
            ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path / f"m{micro}", [f"ppo.micro_batch_size={micro}"])
        )
        rollouts[micro], _ = trainer.rollout(0)
        if micro == 1:
            ro = rollouts[1]
            prompts = ro.attention_mask[:, : ro.prompt_width]
            batches = trainer.experience.scoring_batches(prompts, ro.response_mask, list(range(16)), 4, False)
            assert batches != [list(range(s, s + 4)) for s in (0, 4, 8, 12)]  # out of episode order
    grouped, whole = rollouts[1], rollouts[8]
    assert torch.equal(grouped.query_responses, whole.query_responses)  # the same samples (per-episode seeds)
    mask = whole.response_mask
    for name in ("logprobs", "ref_logprobs", "values"):
        torch.testing.assert_close(getattr(grouped, name)[mask], getattr(whole, name)[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped.raw_scores, whole.raw_scores, rtol=1e-5, atol=1e-5)


def test_generation_in_length_ordered_chunks_gives_every_episode_its_own_sample(
    tiny_world, tiny_sft, tiny_rm, tmp_path
):
    """The rollout generates in chunks of prompts of like length (4 of 4, out of episode order) and puts the
    responses back: every episode's response is the one its prompt gets generated alone (its own seed)."""
    from conftest import ppo_config

    from rlhf.data.batching import length_batches
    from rlhf.generation.sampling import episode_seed
    from rlhf.stages import ppo
    from rlhf.stages.ppo.rollout import ROLLOUT_STREAM

    cfg = ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, ["rollout.generation_batch_size=4"])
    experience = ppo.PPOTrainer(cfg).experience
    prompts = [experience.prompts.ids[j] for j in experience.episode_rows(0)]
    seeds = [episode_seed(cfg.seed, ROLLOUT_STREAM, 0, i) for i in range(len(prompts))]
    assert length_batches([len(p) for p in prompts], 4) != [[i, i + 1, i + 2, i + 3] for i in range(0, 16, 4)]
    together = experience.generator.generate(prompts, seeds)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = experience.generator.generate([prompt], [seed])[0]
        assert together[i, : len(alone)].tolist() == alone.tolist()
        assert set(together[i, len(alone) :].tolist()) <= {experience.tokenizer.pad_token_id}


def test_packed_dpo_pairs_give_the_padded_log_probs_and_loss(tokenizer, tiny_lm):
    from rlhf.stages import dpo

    examples = mixed_rows(tokenizer, n=8)
    # (prompt ids, response ids) from each example's prompt mask; groups of K = 2 and K = 3, best first
    split = [(e["input_ids"][: e["labels"].count(-100)], e["input_ids"][e["labels"].count(-100) :]) for e in examples]
    groups = [split[0:2], split[2:5], split[5:8]]
    padded = dpo.collate_groups(groups, tokenizer.pad_token_id)
    packed = dpo.collate_groups(groups, tokenizer.pad_token_id, pack_length=40)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert int(packed["response_mask"].sum()) == int(padded["response_mask"].sum())
    with torch.no_grad():
        torch.testing.assert_close(
            dpo.sequence_logps(tiny_lm, packed), dpo.sequence_logps(tiny_lm, padded), rtol=1e-5, atol=1e-4
        )
        shifted = lambda model, batch: dpo.sequence_logps(model, batch) - 0.1  # noqa: E731  a reference below
        loss_packed, stats_packed = dpo.preference_loss(tiny_lm, shifted, packed, beta=0.1, label_smoothing=0.0)
        loss_padded, stats_padded = dpo.preference_loss(tiny_lm, shifted, padded, beta=0.1, label_smoothing=0.0)
    assert loss_packed.item() == pytest.approx(loss_padded.item(), rel=1e-5)
    assert stats_packed["accuracy"].item() == stats_padded["accuracy"].item()


def test_length_batches_cover_every_row_once_longest_first():
    from rlhf.data.batching import length_batches

    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(0, 30))]
        size = rng.randint(1, 8)
        batches = length_batches(lengths, size)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(len(b) == size for b in batches[:-1]) and all(0 < len(b) <= size for b in batches)
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(lengths, reverse=True)  # like lengths together, the longest batch first
        assert batches == length_batches(lengths, size)  # deterministic


def _cells(batches, prompts, responses):
    return sum(len(b) * (max(prompts[i] for i in b) + max(responses[i] for i in b)) for b in batches)


def test_aligned_batches_group_by_the_lengths_that_set_the_width():
    """PPO's micro-batches are as wide as their longest prompt plus their longest response. Chat-like prompts of
    very different lengths with responses alike: grouped by the prompt's length, not the response's (4 x (40 + 9)
    + 4 x (6 + 9) cells against 4 x (40 + 8) + 4 x (40 + 9) in the old order by response); prompts alike: by the
    response's length, the old order."""
    from rlhf.data.batching import aligned_batches

    prompts, responses = [5, 40, 4, 38, 6, 39, 3, 40], [9, 8, 9, 7, 8, 9, 7, 8]
    batches = aligned_batches(prompts, responses, 4)
    assert sorted(map(sorted, batches)) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    by_response = [sorted(range(8), key=lambda i: (responses[i], i))[s : s + 4] for s in (0, 4)]
    assert _cells(batches, prompts, responses) == 4 * 49 + 4 * 15
    assert _cells(by_response, prompts, responses) == 4 * 48 + 4 * 49
    alike = [10] * 6
    assert aligned_batches(alike, [5, 1, 4, 2, 6, 3], 2) == [[1, 3], [5, 2], [0, 4]]  # by response, ascending


def test_aligned_batches_cover_every_row_once_and_never_pad_more_than_the_response_order():
    from rlhf.data.batching import aligned_batches

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(0, 40)
        prompts = [rng.randint(1, 60) for _ in range(n)]
        responses = [rng.randint(0, 30) for _ in range(n)]
        size = rng.randint(1, 9)
        batches = aligned_batches(prompts, responses, size)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert all(len(b) == size for b in batches[:-1]) and all(0 < len(b) <= size for b in batches)
        order = sorted(range(n), key=lambda i: (responses[i], i))  # the order before this rule
        old = [order[s : s + size] for s in range(0, n, size)]
        assert _cells(batches, prompts, responses) <= _cells(old, prompts, responses)
        assert batches == aligned_batches(prompts, responses, size)  # deterministic


def test_a_minibatch_plan_groups_episodes_by_prompt_length_when_responses_are_alike():
    """Episodes with prompts of 1-2 and 5-6 tokens (left-padded to 6) and responses of 3: the learner's
    micro-batches of 4 hold the short prompts together and the long ones together (widths 2 + 3 and 6 + 3), where
    sorting by response length alone left every micro-batch 6 + 3 wide."""
    from rlhf.stages.ppo.learner import MinibatchPlan
    from rlhf.stages.ppo.rollout import Rollout

    prompt_lengths, B, P, R = [1, 6, 2, 5, 1, 6, 2, 5], 8, 6, 3
    prompt_mask = torch.arange(P)[None] >= P - torch.tensor(prompt_lengths)[:, None]
    response_mask = torch.ones(B, R, dtype=torch.bool)
    zeros = torch.zeros(B, R)
    ro = Rollout(
        query_responses=torch.ones(B, P + R, dtype=torch.long),
        attention_mask=torch.cat([prompt_mask, response_mask], 1).long(), response_mask=response_mask,
        prompt_width=P, logprobs=zeros, ref_logprobs=zeros, values=zeros, scores=torch.zeros(B),
        raw_scores=torch.zeros(B), score_std=torch.zeros(B), ended=torch.ones(B, dtype=torch.bool), rewards=zeros,
        advantages=zeros, returns=zeros,
    )  # fmt: skip
    plan = MinibatchPlan.of(ro, list(range(B)), [], 0, 1, 4)
    assert sorted(mb.query_responses.shape[1] for mb, _, _ in plan.micro) == [2 + 3, 6 + 3]
    assert sorted(sorted(e.tolist()) for e in plan.episodes) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert int(sum(mb.attention_mask.sum() for mb, _, _ in plan.micro)) == int(ro.attention_mask.sum())


def test_evaluation_in_length_order_gives_every_row_its_own_result(tokenizer, tiny_lm, tiny_value_model):
    """rlhf eval samples, log-probs and reward scores in batches of like length: each row's result is the one it
    gets alone, back in the row's place, and a sample does not depend on the batch size (its own seed), nor on a
    copy of its prompt beside it (samples_per_prompt: the prompt prefilled once)."""
    from types import SimpleNamespace

    from rlhf.models.heads import score_sequences
    from rlhf.stages.evaluate import sample, sequence_logprobs

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, len(tokenizer), (n,), generator=g).tolist() for n in (3, 9, 1, 6, 9, 2, 5)]
    prompts += prompts[3:5]  # two prompts asked twice
    cfg = SimpleNamespace(batch_size=3, max_new_tokens=6, temperature=1.0, seed=0)
    responses = sample(tiny_lm, tokenizer, prompts, cfg, "test")
    for batch_size in (1, 64):
        assert responses == sample(
            tiny_lm, tokenizer, prompts, SimpleNamespace(**vars(cfg) | {"batch_size": batch_size}), "t"
        )
    assert responses[3] != responses[7] and responses[4] != responses[8]  # each copy its own sample
    assert responses != sample(tiny_lm, tokenizer, prompts, SimpleNamespace(**vars(cfg) | {"seed": 1}), "test")
    pad_id = tokenizer.pad_token_id
    with torch.no_grad():
        batched = sequence_logprobs(tiny_lm, prompts, responses, pad_id, 1.0, 3)
        alone = [sequence_logprobs(tiny_lm, [p], [r], pad_id, 1.0, 1)[0] for p, r in zip(prompts, responses)]
        sequences = [p + r for p, r in zip(prompts, responses)]
        scores = score_sequences(tiny_value_model.model, sequences, 3, pad_id, "cpu")
        scores_alone = torch.cat([score_sequences(tiny_value_model.model, [s], 1, pad_id, "cpu") for s in sequences])
    assert [len(x) for x in batched] == [len(r) for r in responses]
    for a, b in zip(batched, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, scores_alone, rtol=1e-5, atol=1e-5)
