"""`rlhf.generation.sampling.generate`: per-episode random streams, the exact distribution, no hub defaults."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.generation.sampling import episode_seed, generate


class Tok:
    pad_token_id, eos_token_id = 0, 1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return LlamaForCausalLM(cfg).eval()


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


def test_a_row_samples_the_same_tokens_in_any_batch(model):
    """What lets N processes sample the episodes one process samples: a row's tokens depend on its seed only."""
    seeds = [episode_seed(0, 0, 3, i) for i in range(len(PROMPTS))]
    _, _, together = generate(model, Tok, PROMPTS, 8, seeds=seeds)
    for i, prompt in enumerate(PROMPTS):
        _, _, alone = generate(model, Tok, [prompt], 8, seeds=[seeds[i]])
        width = alone.shape[1]
        assert torch.equal(together[i, :width], alone[0]), i
    _, _, other = generate(model, Tok, PROMPTS, 8, seeds=[episode_seed(0, 0, 4, i) for i in range(4)])
    assert not torch.equal(other, together)  # another iteration, other samples


def test_gumbel_max_samples_the_softmax(model):
    """4000 one-token samples at temperature 0.7 against softmax(logits / 0.7): every frequency within 0.03."""
    n = 4000
    _, _, tokens = generate(model, Tok, [[5]] * n, 1, temperature=0.7, seeds=[episode_seed(1, i) for i in range(n)])
    with torch.no_grad():
        probs = (model(torch.tensor([[5]])).logits[0, -1] / 0.7).softmax(-1)
    freq = torch.bincount(tokens[:, 0], minlength=50).float() / n
    assert (freq - probs).abs().max() < 0.03


def test_the_checkpoints_generation_config_is_not_applied(model):
    """A hub model's generation_config.json (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20, top_p 0.8) would
    change the distribution PPO computes log-probs under; sampling ignores it, also inside a peft wrapper."""
    from peft import LoraConfig, get_peft_model

    seeds = [episode_seed(2, i) for i in range(len(PROMPTS))]
    _, _, plain = generate(model, Tok, PROMPTS, 8, seeds=seeds)
    saved = copy.deepcopy(model.generation_config)
    model.generation_config.repetition_penalty, model.generation_config.top_k = 50.0, 1
    try:
        _, _, with_defaults = generate(model, Tok, PROMPTS, 8, seeds=seeds)
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=True))
        _, _, through_peft = generate(peft_model, Tok, PROMPTS, 8, seeds=seeds)
        peft_model.unload()
        assert model.generation_config.repetition_penalty == 50.0  # the model's own config is put back
    finally:
        model.generation_config = saved
    assert torch.equal(plain, with_defaults) and torch.equal(plain, through_peft)


def test_unseeded_sampling_uses_the_full_distribution():
    """top_k 0 means no truncation: the library's default top_k (50) must not slip in (a 200-token vocabulary of a
    random model: most of the mass is outside any 50 tokens)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    wide = LlamaForCausalLM(cfg).eval()
    n = 4000
    torch.manual_seed(1)
    _, _, tokens = generate(wide, Tok, [[5]] * n, 1)
    with torch.no_grad():
        probs = wide(torch.tensor([[5]])).logits[0, -1].softmax(-1)
    freq = torch.bincount(tokens[:, 0], minlength=200).float() / n
    assert (freq > 0).sum() > 100  # far more than 50 distinct tokens drawn
    assert (freq - probs).abs().max() < 0.02
