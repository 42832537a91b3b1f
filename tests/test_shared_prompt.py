"""rollout.share_prompt: a group's prompt run once, its k responses on the prompt's KV cache, gives the scoring
forwards' numbers (log-probs, values, reward scores) to float tolerance, for any padding of prompts and responses."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_llama_config

from rlhf.data.batching import pad
from rlhf.generation.sampling import generate
from rlhf.models.forwards import cache_keyword, position_ids_from_mask, response_logprobs, response_values
from rlhf.models.heads import reward_scores
from rlhf.models.shared_prompt import (
    prompt_groups,
    shared_prefill,
    shared_response_logprobs,
    shared_response_values,
    shared_reward_scores,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def test_prompt_groups_index_the_distinct_prompts():
    groups = prompt_groups([5, 5, 7, 7, 7, 9, 5])
    assert groups.first.tolist() == [0, 2, 5] and groups.owner.tolist() == [0, 0, 1, 1, 1, 2, 0]
    assert prompt_groups([1, 2, 3]) is None  # nothing repeats: nothing to share


def grouped_episodes(vocab: int, pad_id: int, k: int = 3):
    """3 prompts (3, 6 and 1 tokens, left-padded to 6), k responses each (1 to 7 tokens, right-padded to 7), the
    episodes of a prompt consecutive: (query_responses [3k, 13], attention_mask, response_mask, prompt rows)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 6, 1)]
    lengths = [1, 7, 4, 2, 7, 5, 3, 6, 1][: 3 * k]
    responses = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    rows = [j for j in range(3) for _ in range(k)]
    episodes = [prompts[j] for j in rows]
    query_responses = torch.cat([pad(episodes, pad_id, side="left", width=6), pad(responses, pad_id, width=7)], 1)
    prompt_mask = pad([[1] * len(p) for p in episodes], 0, side="left", width=6)
    response_mask = pad([[1] * len(r) for r in responses], 0, width=7).bool()
    return query_responses, torch.cat([prompt_mask, response_mask.long()], 1), response_mask, rows


def qwen2_lm(vocab: int, pad_id: int, **config):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = Qwen2Config(vocab_size=vocab, pad_token_id=pad_id, num_key_value_heads=2, **shape | config)
    return Qwen2ForCausalLM(config).eval()  # grouped-query attention, q/k/v biases, tied embeddings


# a window of 4 tokens on the second layer, shorter than every sequence: its cache keeps only the window
SLIDING = dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen2_sliding"])
def test_shared_log_probs_are_the_full_forwards(tokenizer, tiny_lm, family):
    extra = SLIDING if family == "qwen2_sliding" else {}
    model = tiny_lm if family == "llama" else qwen2_lm(len(tokenizer), tokenizer.pad_token_id, **extra)
    if extra:
        assert model.config.layer_types == ["full_attention", "sliding_attention"]
    qr, am, mask, rows = grouped_episodes(len(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        full = response_logprobs(model, qr, am, 6, 0.7)
        shared = shared_response_logprobs(model, qr, am, 6, 0.7, prompt_groups(rows))
    assert shared.shape == full.shape == (9, 7)
    torch.testing.assert_close(shared[mask], full[mask], **TOL)


def test_shared_log_probs_of_a_lora_policy_and_its_reference(tokenizer):
    """The reference as the policy with its adapter off (peft's disable_adapter), as the PPO stage runs it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(len(tokenizer), tokenizer.pad_token_id))
    policy = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    policy.eval()
    qr, am, mask, rows = grouped_episodes(len(tokenizer), tokenizer.pad_token_id)
    groups = prompt_groups(rows)
    with torch.no_grad():
        old = shared_response_logprobs(policy, qr, am, 6, 1.0, groups)
        with policy.disable_adapter():
            ref = shared_response_logprobs(policy, qr, am, 6, 1.0, groups)
            ref_full = response_logprobs(policy, qr, am, 6, 1.0)
        old_full = response_logprobs(policy, qr, am, 6, 1.0)
    torch.testing.assert_close(old[mask], old_full[mask], **TOL)
    torch.testing.assert_close(ref[mask], ref_full[mask], **TOL)
    assert not torch.allclose(old[mask], ref[mask])  # the adapter was on for one and off for the other


def lora_lm(vocab: int, pad_id: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(vocab, pad_id))
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen2_sliding", "lora"])
def test_generation_from_each_prompt_prefilled_once_samples_the_same_tokens(tokenizer, tiny_lm, family):
    """sampling.generate with shared_prefill: the distinct prompts' first P-1 columns run once (seen at the
    embedding), then every episode from its prompt's last column; each row's seeded samples are the ones it gets
    from its whole prompt."""
    vocab, pad_id = len(tokenizer), tokenizer.pad_token_id
    model = {
        "llama": lambda: tiny_lm,
        "qwen2": lambda: qwen2_lm(vocab, pad_id),
        "qwen2_sliding": lambda: qwen2_lm(vocab, pad_id, **SLIDING),
        "lora": lambda: lora_lm(vocab, pad_id),
    }[family]()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 6, 1, 5)]
    episodes = [prompts[j] for j in (0, 0, 0, 1, 1, 2, 2, 2, 3)]  # three groups and a prompt of its own
    seeds = [100 + i for i in range(len(episodes))]
    rows_seen = []
    embed = model.get_input_embeddings().register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape))
    try:
        shared = generate(model, tokenizer, episodes, 12, 0.02, seeds=seeds, prefill=shared_prefill)
    finally:
        embed.remove()
    full = generate(model, tokenizer, episodes, 12, 0.02, seeds=seeds)
    assert rows_seen[:2] == [(4, 5), (9, 1)]  # 4 distinct prompts x 5 columns, then the last column of all 9
    assert torch.equal(shared[0], full[0]) and torch.equal(shared[2], full[2])
    assert shared[2].shape[1] > 1 and len({tuple(r) for r in full[2][:3].tolist()}) > 1  # sampled, and not alike
    # the first sampled token's logits, from the prefilled cache and from the whole prompt (positions as generate's)
    prompt_ids, prompt_mask = full[0], full[1]
    positions = position_ids_from_mask(prompt_mask)
    with torch.no_grad():
        cache = {cache_keyword(model): shared_prefill(model, prompt_ids, prompt_mask)}
        last = model(input_ids=prompt_ids[:, -1:], attention_mask=prompt_mask, position_ids=positions[:, -1:], **cache)
        whole = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions)
    torch.testing.assert_close(last.logits[:, -1], whole.logits[:, -1], **TOL)


def test_shared_prefill_has_nothing_to_share_without_a_repeated_prompt(tiny_lm):
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    assert shared_prefill(tiny_lm, ids, (ids > 0).long()) is None  # every prompt distinct
    assert shared_prefill(tiny_lm, ids[:, -1:].repeat(2, 1), torch.ones(4, 1, dtype=torch.long)) is None  # P = 1


def test_shared_values_and_reward_scores_are_the_full_forwards(tokenizer, tiny_value_model):
    qr, am, mask, rows = grouped_episodes(len(tokenizer), tokenizer.pad_token_id, k=3)
    groups = prompt_groups(rows)
    rm = tiny_value_model.model  # a frozen *ForSequenceClassification, as a reward model is held
    rm.config.reward_offset = 0.25
    try:
        with torch.no_grad():
            values = shared_response_values(tiny_value_model, qr, am, 6, groups)
            values_full = response_values(tiny_value_model, qr, am, 6)
            scores = shared_reward_scores(rm, qr, am, 6, groups)
            scores_full = reward_scores(rm, qr, am)
    finally:
        del rm.config.reward_offset
    torch.testing.assert_close(values[mask], values_full[mask], **TOL)
    torch.testing.assert_close(scores, scores_full, **TOL)


def test_a_rollout_with_the_prompt_shared_is_the_one_without(tiny_world, tiny_sft, tiny_rm, tmp_path):
    """PPO with a critic and k = 4 samples per prompt: the same episodes (the samples do not depend on it) and the
    same old/reference log-probs, values and reward-model scores to float tolerance."""
    from conftest import ppo_config

    from rlhf.stages import ppo

    extra = ["rollout.samples_per_prompt=4", "train.max_steps=1"]
    rollouts = {}
    for share in (True, False):
        cfg = ppo_config(
            tiny_world, tiny_sft, tiny_rm, tmp_path / str(share), extra + [f"rollout.share_prompt={share}"]
        )
        trainer = ppo.PPOTrainer(cfg)
        assert trainer.value_model is not None
        rollouts[share], _ = trainer.rollout(0)
    shared, full = rollouts[True], rollouts[False]
    assert torch.equal(shared.query_responses, full.query_responses)
    mask = full.response_mask
    for name in ("logprobs", "ref_logprobs", "values"):
        torch.testing.assert_close(getattr(shared, name)[mask], getattr(full, name)[mask], **TOL, msg=name)
    torch.testing.assert_close(shared.raw_scores, full.raw_scores, **TOL)


@pytest.mark.parametrize("lora", [False, True])
def test_shared_forwards_give_the_full_forwards_gradients(tokenizer, lora):
    """The learner's differentiated forwards (ppo.group_minibatches): a loss on the shared log-probs and entropies
    of a policy (a LoRA one: its adapters' gradients), and on the shared values of a critic called as a module (as
    through a DDP wrapper), has the full forwards' gradients, every trained parameter's, to float tolerance: each
    response's gradient reaches its prompt's one forward through the copied KV cache."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf.models.heads import TokenValueModel

    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_llama_config(len(tokenizer), tokenizer.pad_token_id))
    if lora:
        adapters = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        policy = get_peft_model(policy, adapters)
    policy.train()
    config = tiny_llama_config(len(tokenizer), tokenizer.pad_token_id, num_labels=1)
    critic = TokenValueModel(LlamaForSequenceClassification(config)).train()
    qr, am, mask, rows = grouped_episodes(len(tokenizer), tokenizer.pad_token_id)
    groups = prompt_groups(rows)
    weights = torch.linspace(-1.0, 1.0, mask.numel()).view_as(mask) * mask  # a loss that weighs each token apart

    def gradients(logprobs_of, values_of):
        for model in (policy, critic):
            model.zero_grad()
        logprobs, entropy = logprobs_of(policy, qr, am, 6, 0.7, entropy=True)
        values = values_of(critic, qr, am, 6)
        ((logprobs + 0.1 * entropy + values) * weights).sum().backward()
        return [p.grad.clone() for model in (policy, critic) for p in model.parameters() if p.grad is not None]

    full = gradients(response_logprobs, response_values)
    shared = gradients(
        functools.partial(shared_response_logprobs, groups=groups),
        functools.partial(shared_response_values, groups=groups),
    )
    trained = [p for model in (policy, critic) for p in model.parameters() if p.requires_grad]
    assert len(shared) == len(full) == len(trained)
    for a, b in zip(shared, full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_grouped_minibatch_order_keeps_each_group_whole():
    from rlhf.stages.ppo.learner import minibatch_order

    g = torch.Generator().manual_seed(3)
    order = minibatch_order(24, 4, g)
    assert sorted(order) == list(range(24))
    groups = [order[s : s + 4] for s in range(0, 24, 4)]
    assert all(grp == list(range(grp[0], grp[0] + 4)) and grp[0] % 4 == 0 for grp in groups)
    assert [grp[0] for grp in groups] != sorted(grp[0] for grp in groups)  # the groups are shuffled
    singly = minibatch_order(24, 1, torch.Generator().manual_seed(3))
    assert singly == torch.randperm(24, generator=torch.Generator().manual_seed(3)).tolist()  # unchanged default


def test_grouped_minibatch_plan_keeps_groups_in_micro_batches_and_marks_them():
    """Micro-batches of 4 from a minibatch of 3 groups of k = 2 (longest responses 5, 2, 7; prompts alike): whole
    groups, ordered to compute the fewest cells (longest first: the short group alone in the partial micro-batch,
    4 x 9 + 2 x 4 cells against 4 x 7 + 2 x 9 shortest first), each micro-batch's shared prompts marked."""
    from rlhf.stages.ppo.learner import MinibatchPlan
    from rlhf.stages.ppo.rollout import Rollout

    lengths = [5, 3, 0, 0, 2, 1, 7, 7, 4, 6]  # episodes 0..9; groups of 2: (0,1) (2,3) (4,5) (6,7) (8,9)
    B, R = len(lengths), 8
    response_mask = torch.arange(R)[None] < torch.tensor(lengths)[:, None]
    attention_mask = torch.cat([torch.ones(B, 2, dtype=torch.long), response_mask.long()], 1)
    zeros = torch.zeros(B, R)
    ro = Rollout(
        query_responses=torch.ones(B, 2 + R, dtype=torch.long), attention_mask=attention_mask,
        response_mask=response_mask, prompt_width=2, logprobs=zeros, ref_logprobs=zeros, values=zeros,
        scores=torch.zeros(B), raw_scores=torch.zeros(B), score_std=torch.zeros(B),
        ended=torch.ones(B, dtype=torch.bool), rewards=zeros, advantages=zeros, returns=zeros,
    )  # fmt: skip
    plan = MinibatchPlan.of(ro, [6, 7, 0, 1, 4, 5], [], 0, 1, 4, group_size=2, share_prompt=True)
    assert [mb.response_mask.sum(1).tolist() for mb, _, _ in plan.micro] == [[7, 7, 5, 3], [2, 1]]
    assert [groups.owner.tolist() for _, _, groups in plan.micro] == [[0, 0, 1, 1], [0, 0]]
    assert sum(float(share) for _, share, _ in plan.micro) == pytest.approx(1.0)
    plain = MinibatchPlan.of(ro, [4, 5, 6, 7, 0, 1], [], 0, 1, 4)  # the default: by length, nothing shared
    assert [mb.response_mask.sum(1).tolist() for mb, _, _ in plain.micro] == [[7, 7, 5, 3], [2, 1]]
    assert all(groups is None for _, _, groups in plain.micro)


def test_grouped_ppo_updates_with_the_prompt_shared_are_the_ones_without(tiny_world, tiny_sft, tiny_rm, tmp_path):
    """PPO with a critic, k = 4, whole groups per minibatch (micro-batches of 8 = two groups, ptx on): three
    iterations with the learner's (and the scoring's) prompt forwards shared end at the weights of the same run
    without sharing, to float tolerance, for the policy and the critic."""
    from conftest import load_safetensors_dir, ppo_config

    from rlhf.stages import ppo

    extra = ["rollout.samples_per_prompt=4", "ppo.group_minibatches=true", "ppo.micro_batch_size=8"]
    extra += ["train.max_steps=3", "checkpoint.every=2", "train.mixed_precision=no"]
    for share in (True, False):
        cfg = ppo_config(
            tiny_world, tiny_sft, tiny_rm, tmp_path / str(share), extra + [f"rollout.share_prompt={share}"]
        )
        trainer = ppo.PPOTrainer(cfg)
        assert trainer.learner.share_prompt is share
        trainer.train()
    for part in ("checkpoint-2/value", "final"):
        shared = load_safetensors_dir(tmp_path / "True" / part)
        full = load_safetensors_dir(tmp_path / "False" / part)
        for name in full:
            torch.testing.assert_close(shared[name], full[name], rtol=1e-4, atol=2e-6, msg=f"{part}: {name}")
    start = load_safetensors_dir(tiny_sft)  # the updates moved the policy: not two untouched copies compared
    assert max((full[n] - start[n]).abs().max().item() for n in start) > 1e-4
