"""`rlhf plan`: the memory/time estimator's arithmetic against hand-computed values and real models."""

from __future__ import annotations

import json

import pytest
from conftest import CONFIGS, QWEN25_05B, SMALL_LLAMA

from rlhf.cli import main
from rlhf.config import load_config
from rlhf.tools.plan import (
    GiB,
    activation_bytes,
    kv_cache_bytes,
    load_shape,
    lora_params,
    parse_bytes,
    plan_config,
    plan_dpo,
    plan_ppo,
    plan_rm,
    plan_sft,
    precision,
    role_static,
    shape_from_hf_config,
)


def small_llama():
    from transformers import LlamaConfig

    return LlamaConfig(**SMALL_LLAMA)


def test_parameter_counts_equal_the_built_models():
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = small_llama()
    shape = shape_from_hf_config(config)
    lm = AutoModelForCausalLM.from_config(config)
    assert shape.params_lm == sum(p.numel() for p in lm.parameters())
    # by hand: embeddings + lm_head (untied) + 2 x (q,o 64x64; k,v 64x32; gate,up,down 64x176; two norms) + norm
    h, kv, inter, v = 64, 32, 176, 300
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    assert shape.params_lm == 2 * v * h + 2 * per_layer + h
    config.num_labels = 1
    scalar = AutoModelForSequenceClassification.from_config(config)
    assert shape.params_scalar == sum(p.numel() for p in scalar.parameters()) == shape.params_lm - v * h + h
    assert (shape.heads, shape.kv_heads, shape.head_dim) == (4, 2, 16)


def test_tied_embeddings_are_counted_once(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_05B))
    shape = load_shape(str(tmp_path))
    assert shape.params_lm == 494_032_768  # Qwen2.5-0.5B's published parameter count
    assert shape.params_scalar == shape.params_lm + 896  # the tied embedding stays; a 896 x 1 score head is added


def test_lora_count_equals_peft_trainable_params():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = small_llama()
    shape = shape_from_hf_config(config)
    for targets in (["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "v_proj", "gate_proj", "down_proj"]):
        model = get_peft_model(
            AutoModelForCausalLM.from_config(config), LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM")
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert lora_params(shape, 8, targets) == trainable


def test_adamw_state_and_sharding_divisors():
    fp32 = precision("float32", "no", "ddp")
    role = role_static("m", 1000, 1000, fp32, "ddp", 4)
    assert (role.weights, role.grads, role.optimizer) == (4000, 4000, 8000)  # AdamW m + v: 8 B per fp32 param
    z2 = role_static("m", 1000, 1000, fp32, "zero2", 4)
    assert (z2.weights, z2.grads, z2.optimizer) == (4000, 1000, 2000)  # weights stay whole
    for topo in ("zero3", "fsdp"):
        z3 = role_static("m", 1000, 1000, fp32, topo, 4)
        assert (z3.weights, z3.grads, z3.optimizer) == (1000, 1000, 2000)  # weights sharded too
    # DeepSpeed ZeRO with bf16: 2 + 2 + 12 (fp32 master + m + v) bytes per param
    zb = role_static("m", 1000, 1000, precision("float32", "bf16", "zero2"), "zero2", 1)
    assert (zb.weights, zb.grads, zb.optimizer) == (2000, 2000, 12000)
    frozen = role_static("ref", 1000, 0, fp32, "zero3", 4)
    assert (frozen.weights, frozen.grads, frozen.optimizer) == (1000, 0, 0)  # frozen roles are sharded too
    frozen = role_static("ref", 1000, 0, fp32, "ddp", 4)
    assert (frozen.weights, frozen.grads, frozen.optimizer) == (4000, 0, 0)
    # LoRA: only the adapters get gradients and optimizer state
    lora = role_static("m", 1000, 10, fp32, "ddp", 1)
    assert (lora.weights, lora.grads, lora.optimizer) == (4000, 40, 80)


def test_activations_kv_cache_and_checkpointing():
    shape = shape_from_hf_config(small_llama())
    b, s, p = 2, 16, 4
    per_token = p * (4 * 64 + 2 * 64 + 2 * 32 + 4 * 176)
    layer = b * s * per_token
    logits = b * s * 300 * (p + 8)
    assert activation_bytes(shape, b, s, p, False, lm_head=True) == 2 * layer + b * s * 64 * p + logits
    ckpt = activation_bytes(shape, b, s, p, True, lm_head=True)
    assert ckpt == 2 * b * s * 64 * p + layer + b * s * 64 * p + logits
    assert activation_bytes(shape, b, s, p, False, lm_head=False) < activation_bytes(shape, b, s, p, False, True)
    assert kv_cache_bytes(shape, 8, 100, 2) == 8 * 100 * 2 * 2 * 2 * 16 * 2


def test_qwen_ppo_plan_roles_and_lora(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_05B))
    shape = load_shape(str(tmp_path))
    sets = [f"models.policy.name_or_path={tmp_path}", f"models.reward.name_or_path={tmp_path}"]
    cfg = load_config("ppo", str(CONFIGS / "qwen2.5-0.5b-hh" / "ppo.yaml"), sets)
    plan = plan_ppo(cfg, shape, shape)
    assert [r.role for r in plan.roles] == ["policy", "reference", "value", "reward"]
    policy, ref, value, reward = plan.roles
    assert policy.trainable == shape.params_lm and ref.trainable == 0 and reward.trainable == 0
    assert value.trainable == shape.params_scalar
    assert policy.kv_cache == kv_cache_bytes(shape, 64, 512 + 256, 2)
    lora_cfg = load_config("ppo", str(CONFIGS / "qwen2.5-0.5b-hh-lora" / "ppo.yaml"), sets)
    lora_plan = plan_ppo(lora_cfg, shape, shape)
    lpol, lref = lora_plan.roles[:2]
    assert lpol.trainable == lora_params(shape, 16, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert lref.weights == 0  # the reference is the policy with its adapter off
    assert lora_plan.total < plan.total
    # under zero3 the trained roles shrink per device, the frozen ones do not
    z3 = plan_ppo(cfg, shape, shape, num_processes=8, topology="zero3")
    assert z3.roles[0].weights < policy.weights and z3.roles[1].weights == 494032768 * 2 // 8


def test_sft_plan_tokens_and_flops(tiny_world):
    cfg = load_config(
        "sft", str(CONFIGS / "tiny" / "pretrain.yaml"), [f"model.name_or_path={tiny_world / 'model_config'}"]
    )
    shape = load_shape(cfg.model)
    plan = plan_sft(cfg, shape)
    assert plan.tokens == {"trained": 64 * 64}
    assert plan.flops == 6 * shape.params_lm * 64 * 64
    assert plan.seconds(1.0, 1) == pytest.approx(plan.flops / 1e12)
    # a named eager kernel keeps the [heads, s, s] scores for backward: more activation memory than sdpa's
    assert not shape.eager_attention
    eager_cfg = load_config(
        "sft",
        str(CONFIGS / "tiny" / "pretrain.yaml"),
        [f"model.name_or_path={tiny_world / 'model_config'}", "model.attn_implementation=eager"],
    )
    eager = plan_sft(eager_cfg, load_shape(eager_cfg.model))
    assert eager.roles[0].activations > plan.roles[0].activations


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GiB
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("40") == 40 * GiB


def _ppo_sets(world) -> list[str]:
    return [
        f"models.policy.name_or_path={world / 'model_config'}",
        f"models.reward.name_or_path={world / 'model_config'}",
    ]


def test_cli_plan_tiny_ppo(tiny_world, capsys):
    sets = [x for s in _ppo_sets(tiny_world) for x in ("--set", s)]
    assert main(["plan", "--config", str(CONFIGS / "tiny" / "ppo.yaml"), *sets, "--tflops", "100"]) == 0
    out = capsys.readouterr().out
    for word in ("policy", "reference", "value", "reward", "weights", "kv-cache", "tokens per iteration", "time at"):
        assert word in out
    assert "WARNING" not in out
    # too little memory: a warning, exit 0; with --strict exit 1
    small = ["--device-memory", "1MiB"]
    assert main(["plan", "--config", str(CONFIGS / "tiny" / "ppo.yaml"), *sets, *small]) == 0
    assert "WARNING" in capsys.readouterr().out
    assert main(["plan", "--config", str(CONFIGS / "tiny" / "ppo.yaml"), *sets, *small, "--strict"]) == 1


def test_cli_plan_missing_model_is_a_config_error(capsys):
    missing = ["--set", "models.policy.name_or_path=/nonexistent/sft/final"]
    assert main(["plan", "--config", str(CONFIGS / "tiny" / "ppo.yaml"), *missing]) == 2
    err = capsys.readouterr().err
    assert "models.policy.name_or_path" in err and "config.json" in err
    assert main(["plan", "--config", str(CONFIGS / "tiny" / "ppo.yaml"), "--device-memory", "lots"]) == 2


def test_critic_free_and_function_only_ppo_and_dpo_plans(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_05B))
    shape = load_shape(str(tmp_path))
    sets = [f"models.policy.name_or_path={tmp_path}", f"models.reward.name_or_path={tmp_path}"]
    recipe = str(CONFIGS / "qwen2.5-0.5b-hh" / "ppo.yaml")
    gae = plan_ppo(load_config("ppo", recipe, sets), shape, shape)
    grpo_cfg = load_config("ppo", recipe, sets + ["ppo.advantage=grpo", "rollout.samples_per_prompt=4"])
    grpo = plan_ppo(grpo_cfg, shape, shape)
    value = grpo.roles[2]
    assert value.role == "value" and value.total == 0  # no critic is built: nothing held, nothing trained
    assert grpo.total < gae.total and grpo.flops < gae.flops
    # the shared prompt (on by default): each prompt prefilled and scored once, the k responses on its KV cache
    B, P, R = grpo_cfg.train.batch_size, grpo_cfg.data.format.max_prompt_length, grpo_cfg.rollout.max_new_tokens
    assert grpo.tokens["scored"] == B // 4 * P + B * R
    whole = plan_ppo(load_config("ppo", recipe, sets + ["ppo.advantage=grpo", "rollout.samples_per_prompt=4",
                                                        "rollout.share_prompt=false"]), shape, shape)  # fmt: skip
    assert whole.tokens["scored"] == B * (P + R) and whole.flops - grpo.flops == 2 * (B - B // 4) * P * (
        3 * shape.params_lm + shape.params_scalar  # generation's prefill, policy and reference, one reward model
    )
    assert grpo.phases["score"] > whole.phases["score"]  # for the cache it holds
    # whole groups per minibatch: the update's forwards share the prompt as well (not with the recipe's gradient
    # checkpointing, which turns the KV cache off)
    base = sets + ["ppo.advantage=grpo", "rollout.samples_per_prompt=4"]
    assert (
        plan_ppo(load_config("ppo", recipe, base + ["ppo.group_minibatches=true"]), shape, shape).flops == grpo.flops
    )
    base += ["models.policy.gradient_checkpointing=false", "ptx.ptx_coef=0"]
    grpo = plan_ppo(load_config("ppo", recipe, base), shape, shape)
    grouped_cfg = load_config("ppo", recipe, base + ["ppo.group_minibatches=true"])
    grouped = plan_ppo(grouped_cfg, shape, shape)
    epochs = grouped_cfg.ppo.ppo_epochs
    assert grouped.tokens["trained"] - grpo.tokens["trained"] == -epochs * (B - B // 4) * P
    assert grpo.flops - grouped.flops == epochs * (B - B // 4) * P * 6 * shape.params_lm  # no critic, no LoRA
    assert grouped.phases["train"] > grpo.phases["train"]  # the keys/values copied to each episode, held
    # one optimizer step with the KL in the loss: the update's forward gives the old log-probs, one scoring
    # forward of the policy fewer (the KL in the reward needs it before the update)
    one_step = base + ["ppo.ppo_epochs=1", f"ppo.mini_batch_size={B}", "kl.placement=loss"]
    in_reward = plan_ppo(load_config("ppo", recipe, one_step[:-1]), shape, shape)
    in_loss = plan_ppo(load_config("ppo", recipe, one_step), shape, shape)
    assert in_reward.flops - in_loss.flops == 2 * grpo.tokens["scored"] * shape.params_lm
    # and without a reference (beta 0): neither its weights nor its scoring forward
    no_ref = plan_ppo(
        load_config(
            "ppo", recipe, one_step + ["kl.kl_coef=0", "kl.adaptive=false", "kl.budget=0", "models.reference=none"]
        ),
        shape,
        shape,
    )
    assert no_ref.roles[1].role == "reference" and no_ref.roles[1].total == 0
    assert in_loss.flops - no_ref.flops == 2 * grpo.tokens["scored"] * shape.params_lm
    assert no_ref.phases["score"] < in_loss.phases["score"]  # the reward model's forward alone: no logits to hold
    # a reward function only: no reward model held either
    fn = sets[:1] + ["models.reward.name_or_path=", "reward.function=rlhf.tiny:gold_judge", "models.value_init=policy"]
    only_fn = plan_config("ppo", load_config("ppo", recipe, fn))
    assert [r.role for r in only_fn.roles] == ["policy", "reference", "value"]
    # DPO: the policy trained on prompts x K responses, the reference forward-only on the same batch
    dpo_cfg = load_config("dpo", str(CONFIGS / "tiny" / "dpo.yaml"), [f"model.name_or_path={tmp_path}"])
    dpo = plan_dpo(dpo_cfg, shape, responses_per_prompt=4, mixed_precision="no")
    policy, ref = dpo.roles
    assert policy.trainable == shape.params_lm and ref.trainable == 0 and ref.weights == policy.weights
    # under bf16 autocast the frozen reference keeps its Linear weights in 2 bytes; Qwen2.5-0.5B ties its LM head
    # to the embedding (kept fp32): per layer q 896x896+896, k and v 896x128+128, o 896x896, MLP 3 x 896x4864
    assert shape.linear_params_scalar == shape.linear_params_lm  # its [896 -> 1] score head stays fp32
    assert shape.linear_params_lm == 24 * (803_712 + 2 * 114_816 + 802_816 + 3 * 896 * 4864) == 357_854_208
    half = plan_dpo(dpo_cfg, shape, responses_per_prompt=4, mixed_precision="bf16").roles[1]
    assert half.weights == ref.weights - 2 * shape.linear_params_lm and half.note == "frozen copy, Linears in bf16"
    zero3 = plan_dpo(dpo_cfg, shape, responses_per_prompt=4, mixed_precision="bf16", topology="zero3").roles[1]
    assert zero3.weights == 2 * shape.params_lm  # DeepSpeed's inference engine casts it all (not our conversion)
    dpo = plan_dpo(dpo_cfg, shape, responses_per_prompt=4)
    tokens = dpo_cfg.train.batch_size * 4 * dpo_cfg.data.format.max_length
    assert dpo.tokens == {"trained": tokens} and dpo.flops == tokens * 8 * shape.params_lm  # 6N train + 2N reference
    # share_prompt: each prompt once, then its 4 responses: P + 4 x R tokens per prompt instead of 4 x (P + R)
    shared_cfg = load_config(
        "dpo", str(CONFIGS / "tiny" / "dpo.yaml"), [f"model.name_or_path={tmp_path}", "share_prompt=true"]
    )
    shared = plan_dpo(shared_cfg, shape, responses_per_prompt=4)
    fmt = shared_cfg.data.format
    per_prompt = fmt.max_prompt_length + 4 * (fmt.max_length - fmt.max_prompt_length)
    assert shared.tokens == {"trained": shared_cfg.train.batch_size * per_prompt} and per_prompt < 4 * fmt.max_length
    assert shared.flops == shared.tokens["trained"] * 8 * shape.params_lm and shared.settings["share_prompt"]
    assert shared.roles[0].activations < dpo.roles[0].activations  # the prompts' activations once, plus the cache
    sharded = plan_dpo(shared_cfg, shape, responses_per_prompt=4, topology="fsdp")
    assert sharded.tokens == dpo.tokens and not sharded.settings["share_prompt"]  # off under FSDP, as at run time
    # the RM the same way: P + K x R tokens per prompt with share_prompt, K x max_length without
    rm_sets = [f"model.name_or_path={tmp_path}", "ensemble.size=1", "ensemble.holdout=0"]
    rm_cfg = load_config("rm", str(CONFIGS / "tiny" / "rm.yaml"), rm_sets)
    rm_shared_cfg = load_config("rm", str(CONFIGS / "tiny" / "rm.yaml"), rm_sets + ["share_prompt=true"])
    rm, rm_shared = (plan_rm(c, shape, responses_per_prompt=4) for c in (rm_cfg, rm_shared_cfg))
    fmt = rm_cfg.data.format
    assert rm.tokens == {"trained": rm_cfg.train.batch_size * 4 * fmt.max_length}
    per_prompt = fmt.max_prompt_length + 4 * (fmt.max_length - fmt.max_prompt_length)
    assert rm_shared.tokens == {"trained": rm_cfg.train.batch_size * per_prompt}
    assert rm_shared.flops * rm.tokens["trained"] == rm.flops * rm_shared.tokens["trained"]
    assert rm_shared.roles[0].activations < rm.roles[0].activations and rm_shared.settings["share_prompt"]


def test_fsdp_holds_the_root_unit_and_two_layers_whole_while_a_model_runs():
    """SMALL_LLAMA (d 64, 2 layers, MLP 176, vocabulary 300, untied): a layer's parameters are q/k/v/o (GQA 4/2
    heads of 16) + the MLP + 2 norms; the root unit is the embeddings, the LM head and the final norm."""
    from rlhf.tools.plan.memory import gathered_bytes

    shape = shape_from_hf_config(small_llama())
    layer = 64 * (2 * 64 + 2 * 32) + 3 * 64 * 176 + 2 * 64
    root = 300 * 64 * 2 + 64
    assert shape.params_lm == root + 2 * layer  # the counts the formula splits are the model's
    assert gathered_bytes(shape, 4, "fsdp") == (root + 2 * layer) * 4
    assert gathered_bytes(shape, 4, "fsdp", grads=True) == 2 * (root + 2 * layer) * 4
    assert gathered_bytes(shape, 4, "ddp") == 0 == gathered_bytes(shape, 4, "zero2")
