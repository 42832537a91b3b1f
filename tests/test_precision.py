"""bf16 autocast on CPU: when `auto` picks it, and that it trains like fp32 (loss curves within a stated tolerance).

`mixed_precision: auto` is bf16 on a CUDA GPU with bf16 and on a CPU with bf16 matrix instructions (AVX512-BF16 or
AMX: oneDNN's bf16 matmuls run at 2-4x the fp32 rate there, docs/benchmarks.md), else fp32. Weights, optimizer
state and the loss reductions stay fp32 (autocast), so the runs differ from fp32 by bf16 rounding in the matmuls.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import SMALL_LLAMA, load_stage, ppo_config, read_metrics, sft_overrides

from rlhf.runtime.accelerator import fast_bf16, make_accelerator
from rlhf.stages import ppo, sft


def test_auto_precision_follows_the_hardware(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert fast_bf16(cpu=True)
    assert make_accelerator("auto", tmp_path, tensorboard=False, cpu=True).mixed_precision == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not fast_bf16(cpu=True)
    assert make_accelerator("auto", tmp_path, tensorboard=False, cpu=True).mixed_precision == "no"
    assert make_accelerator("bf16", tmp_path, tensorboard=False, cpu=True).mixed_precision == "bf16"


def test_bf16_sft_follows_the_fp32_loss_curve(tiny_world, tiny_base, tmp_path):
    """20 SFT steps from the same base: every logged train loss within 0.05 nats of fp32's (measured: 3e-4)."""
    curves = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        mapping = sft_overrides(tiny_world, out, tiny_base, train__max_steps=20, logging__every=5)
        sft.train(load_stage("sft", "sft.yaml", mapping | {"train.mixed_precision": precision}))
        curves[precision] = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert len(curves["no"]) == len(curves["bf16"]) == 4
    assert curves["bf16"][-1] < curves["bf16"][0]
    assert max(abs(a - b) for a, b in zip(curves["no"], curves["bf16"])) < 0.05, curves


def test_bf16_ppo_ratios_start_near_one(tiny_world, tiny_sft, tiny_rm, tmp_path):
    """Under bf16 the rollout's and the update's forwards round differently (other batch shapes), so the first
    ratio is 1 only to bf16 precision: its mean within 1e-2 of 1 and few tokens clipped."""
    cfg = ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, ["train.max_steps=2", "train.mixed_precision=bf16"])
    ppo.train(cfg)
    rows = [r for r in read_metrics(tmp_path) if "objective/scores" in r]
    assert len(rows) == 2 and all(abs(r["policy/ratio_avg"] - 1) < 1e-2 for r in rows), rows
    assert rows[0]["policy/clipfrac_avg"] < 0.05


def _qkv(batch: int, heads: int, length: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=g) for _ in range(3)]


class _Attention(torch.nn.Module):  # what transformers' attention functions read off the calling module
    is_causal = True


def test_cpu_attention_is_sdpa_in_fp32():
    """In fp32 the function is transformers' sdpa (same kernel, same bits); under bf16 autocast on CPU it runs the
    kernel on fp32 q/k/v (the autocast kernel would round them to bf16 and run 2-4x slower at these lengths)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from rlhf.models.attention import cpu_sdpa_attention

    q, k, v = _qkv(2, 4, 24, 16)
    module = _Attention()
    expected, _ = sdpa_attention_forward(module, q, k, v, None)
    out, _ = cpu_sdpa_attention(module, q, k, v, None)
    assert torch.equal(out, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = cpu_sdpa_attention(module, q, k, v, None)
        rounded, _ = sdpa_attention_forward(module, q, k, v, None)  # the kernel autocast picks: bf16
    assert out.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    assert (rounded.float() - expected).abs().max() > 1e-4  # so the equality above is not vacuous
    # bf16 q/k/v (bf16 weights): fp32 kernel, the result back in bf16
    out, _ = cpu_sdpa_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    exact, _ = sdpa_attention_forward(module, q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), None)
    assert out.dtype == torch.bfloat16 and torch.equal(out, exact.bfloat16())


def test_cpu_attention_keeps_the_half_kernel_for_long_sequences():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from rlhf.models.attention import CPU_FP32_ATTENTION_MAX_KEYS, cpu_sdpa_attention

    q, k, v = (t.bfloat16() for t in _qkv(1, 2, CPU_FP32_ATTENTION_MAX_KEYS + 1, 8))
    out, _ = cpu_sdpa_attention(_Attention(), q, k, v, None)
    expected, _ = sdpa_attention_forward(_Attention(), q, k, v, None)
    assert torch.equal(out, expected)


def test_models_load_with_the_cpu_attention_and_save_without_it(tiny_sft, tokenizer, tmp_path):
    """auto: the loaded model runs through cpu_sdpa_attention, gives sdpa's logits bit for bit in fp32, and its saved
    config.json names no attention kernel (it loads anywhere with transformers' default); a named kernel is used
    as given; a kernel transformers does not know is a ConfigError naming the key."""
    import json

    import pytest
    from transformers import AutoModelForCausalLM

    from rlhf.config import ConfigError, ModelConfig
    from rlhf.models.attention import CPU_SDPA
    from rlhf.models.loading import load_causal_lm, load_reward_model

    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_sft)), tokenizer, dropout=False).eval()
    assert model.config._attn_implementation == CPU_SDPA
    rm = load_reward_model(ModelConfig(name_or_path=str(tiny_sft)), tokenizer, new_head=True)
    assert rm.config._attn_implementation == CPU_SDPA
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_sft), attn_implementation="sdpa").eval()
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [4, 5, 6, 7, 8, 9]])
    mask = (ids != 0).long()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert not any("attn" in key for key in saved), saved
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"
    eager = load_causal_lm(ModelConfig(name_or_path=str(tiny_sft), attn_implementation="eager"), tokenizer)
    assert eager.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="models.policy.attn_implementation = 'nonsense'"):
        load_causal_lm(
            ModelConfig(name_or_path=str(tiny_sft), attn_implementation="nonsense"),
            tokenizer,
            key="models.policy.name_or_path",
        )


def test_scalar_head_is_not_rounded_to_bf16(tiny_sft, tokenizer):
    """Under bf16 autocast the backbone runs in bf16 but the [d -> 1] score head in fp32: scores keep fp32 digits
    (autocast would round them to bf16's ~3, a score of 4.3 to +-0.016), and equal the fp32 head on the hidden
    states the backbone produced."""
    from rlhf.config import ModelConfig
    from rlhf.models.forwards import backbone, position_ids_from_mask
    from rlhf.models.heads import token_values
    from rlhf.models.loading import load_reward_model

    rm = load_reward_model(ModelConfig(name_or_path=str(tiny_sft)), tokenizer, new_head=True)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [4, 5, 6, 7, 8, 9]])
    mask = (ids != 0).long()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        values = token_values(rm, ids, mask)
        hidden = backbone(rm)(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    expected = hidden.last_hidden_state.float() @ rm.score.weight.float().T
    assert values.dtype == torch.float32
    assert torch.allclose(values, expected.squeeze(-1), atol=1e-6)
    assert not torch.equal(values, values.bfloat16().float())  # off bf16's grid


def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as PPO's rollouts have
    return ids, mask


def test_frozen_linears_in_bf16_change_no_output(tiny_lm):
    """A frozen causal LM's Linear weights stored in bf16: the logits under bf16 autocast are bit-identical (autocast
    rounds the fp32 weights to the same bf16 values on every call); embeddings and norms stay fp32. With tied
    embeddings the LM head is the embedding matrix, which autocast does not cast: it stays fp32."""
    from rlhf.models.forwards import causal_logits
    from rlhf.models.precision import half_precision_linears

    ids, mask = _padded_batch(tiny_lm.config.vocab_size)
    for tied in (False, True):
        model = copy.deepcopy(tiny_lm)
        if tied:
            model.config.tie_word_embeddings = True
            model.lm_head.weight = model.model.embed_tokens.weight
        with torch.no_grad(), _bf16_autocast():
            expected = causal_logits(model, ids, mask)
        fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
        saved = half_precision_linears(model, _bf16_autocast)
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.weight.dtype == torch.bfloat16 and model.model.layers[1].mlp.down_proj.weight.dtype == (
            torch.bfloat16
        )
        assert model.model.embed_tokens.weight.dtype == torch.float32
        assert model.model.norm.weight.dtype == torch.float32
        assert model.lm_head.weight.dtype == (torch.float32 if tied else torch.bfloat16)
        linear = sum(
            m.weight.numel()
            for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m.weight.dtype != torch.float32
        )
        assert saved == 2 * linear and 0 < saved < fp32_bytes / 2
        with torch.no_grad(), _bf16_autocast():
            assert torch.equal(causal_logits(model, ids, mask), expected)
        # without autocast (an fp32 run: accelerate's autocast() is a null context) nothing is converted
        assert half_precision_linears(copy.deepcopy(tiny_lm), contextlib.nullcontext) == 0


def test_frozen_reward_model_keeps_its_fp32_head(tiny_lm):
    """The reward model's scalar head runs with autocast off (its score in fp32): the probe sees that call outside
    autocast and leaves the head fp32; the backbone's Linears go bf16; the scores are bit-identical."""
    from transformers import LlamaForSequenceClassification

    from rlhf.models.heads import TokenValueModel
    from rlhf.models.precision import half_precision_linears

    config = copy.deepcopy(tiny_lm.config)  # the same small Llama, with a scalar head
    config.num_labels = 1
    torch.manual_seed(0)
    reward = TokenValueModel(LlamaForSequenceClassification(config).eval()).requires_grad_(False)
    ids, mask = _padded_batch(config.vocab_size)
    with torch.no_grad(), _bf16_autocast():
        expected = reward(ids, mask)
    assert half_precision_linears(reward, _bf16_autocast) > 0
    assert reward.model.score.weight.dtype == torch.float32
    assert reward.model.model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16
    with torch.no_grad(), _bf16_autocast():
        values = reward(ids, mask)
    assert values.dtype == torch.float32 and torch.equal(values, expected)


def test_bf16_ppo_frozen_reference_starts_at_zero_kl(tiny_world, tiny_sft, tiny_rm, tmp_path):
    """Under bf16 the frozen reference and reward model hold bf16 Linear weights, the trained policy and value model
    fp32 masters; at the first rollout the policy is the reference, and their log-probs (same batches, same
    rounding) are equal to the bit: KL exactly 0."""
    cfg = ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, ["train.max_steps=1", "train.mixed_precision=bf16"])
    trainer = ppo.PPOTrainer(cfg)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert dict(trainer.reference.named_parameters())[q_proj].dtype == torch.bfloat16
    assert dict(trainer.policy.named_parameters())[q_proj].dtype == torch.float32
    assert dict(trainer.reward_models[0].named_parameters())["model." + q_proj].dtype == torch.bfloat16
    rollout, _ = trainer.rollout(0)
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)


def test_frozen_conversion_releases_the_checkpoint_memory_map(tiny_sft):
    """On CPU from_pretrained's weights point into a memory map of model.safetensors, resident while any tensor
    does: after the conversion none does (the fp32 file is released, the model holds only its bf16 + fp32 copies)."""
    from transformers import AutoModelForCausalLM

    from rlhf.models.precision import half_precision_linears

    def mapped(model) -> int:
        spans = []
        for line in open("/proc/self/maps"):
            if line.rstrip().endswith("model.safetensors"):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                spans.append((start, end))
        return sum(any(a <= t.data_ptr() < b for a, b in spans) for t in model.parameters())

    model = AutoModelForCausalLM.from_pretrained(tiny_sft, dtype=torch.float32).eval().requires_grad_(False)
    assert mapped(model) > 0  # so the check below can fail
    assert half_precision_linears(model, _bf16_autocast) > 0
    assert mapped(model) == 0


@pytest.mark.parametrize(
    "arch, extra, converts",
    [
        ("qwen2", {}, True),  # biased q/k/v projections
        ("gemma", {"head_dim": 16, "tie_word_embeddings": True}, True),  # LM head tied to the embedding: kept fp32
        ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, True),  # router and experts are not nn.Linear
        ("gpt2", {}, False),  # Conv1D layers, no nn.Linear but the tied LM head: nothing converted
    ],
)
def test_frozen_conversion_is_exact_across_architectures(arch, extra, converts):
    """Random small models of several families, as causal LM and as reward model: outputs under bf16 autocast are
    bit-identical before and after the conversion."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.models.forwards import causal_logits
    from rlhf.models.heads import TokenValueModel
    from rlhf.models.precision import half_precision_linears

    kwargs = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128, pad_token_id=0)
    config = AutoConfig.for_model(arch, **(kwargs if arch == "gpt2" else SMALL_LLAMA | {"pad_token_id": 0} | extra))
    ids, mask = _padded_batch(config.vocab_size)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    config.num_labels = 1
    reward = TokenValueModel(AutoModelForSequenceClassification.from_config(config).eval()).requires_grad_(False)
    for model, forward in ((lm, lambda m: causal_logits(m, ids, mask)), (reward, lambda m: m(ids, mask))):
        with torch.no_grad(), _bf16_autocast():
            expected = forward(model)
        assert (half_precision_linears(model, _bf16_autocast) > 0) == converts
        with torch.no_grad(), _bf16_autocast():
            assert torch.equal(forward(model), expected)
