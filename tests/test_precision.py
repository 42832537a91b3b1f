"""bf16 autocast on CPU: when `auto` picks it, and that it trains like fp32 (loss curves within a stated tolerance).

`mixed_precision: auto` is bf16 on a CUDA GPU with bf16 and on a CPU with bf16 matrix instructions (AVX512-BF16 or
AMX: oneDNN's bf16 matmuls run at 2-4x the fp32 rate there, docs/benchmarks.md), else fp32. Weights, optimizer
state and the loss reductions stay fp32 (autocast), so the runs differ from fp32 by bf16 rounding in the matmuls.
"""

from __future__ import annotations

import torch
from conftest import load_stage, ppo_config, read_metrics, sft_overrides

from rlhf import ppo, sft
from rlhf.training import fast_bf16, make_accelerator


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
