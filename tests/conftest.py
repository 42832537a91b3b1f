"""Shared fixtures: the tiny world, a quickly pretrained base model and a quick SFT model (session-scoped).

Every path a shipped tiny YAML names is overridden into tmp dirs, so tests never touch `runs/`.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Quiet, quick runs: no progress bar, no TensorBoard, no sampled text, no checkpoints unless asked for.
QUIET = {
    "logging.progress": "off",
    "logging.tensorboard": "false",
    "logging.num_samples": 0,
    "checkpoint.every": 0,
    "resume": "never",
    "train.mixed_precision": "no",  # fp32: tolerances below are fp32's (bf16 autocast has its own tests)
}


PPO_QUIET = ["logging.progress=off", "logging.tensorboard=false", "train.mixed_precision=no"]


# a small Llama-shaped config (2 layers, d 64, GQA 4/2 heads, vocabulary 300) for shape and precision tests
SMALL_LLAMA = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


# Qwen2.5-0.5B's public config.json (the hub is not reachable in CI; these are its values)
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}


def overrides(mapping: dict | None = None, **kw) -> list[str]:
    """{'train.max_steps': 5} (or train__max_steps=5) -> ['train.max_steps=5'] for load_config / --set."""
    items = dict(mapping or {}) | {k.replace("__", "."): v for k, v in kw.items()}
    out = []
    for key, value in items.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = "[" + ", ".join(str(v) for v in value) + "]"
        out.append(f"{key}={value}")
    return out


def load_stage(stage: str, yaml_name: str, mapping: dict):
    """load_config for a shipped tiny YAML with the quiet defaults and the given overrides."""
    from rlhf.config import load_config

    return load_config(stage, str(CONFIGS / "tiny" / yaml_name), overrides(QUIET | mapping))


def sft_overrides(world: Path, out: Path, model: Path, **extra) -> dict:
    """Overrides for configs/tiny/sft.yaml that point every path into tmp dirs."""
    data = world / "data"
    return {
        "output_dir": out,
        "model.name_or_path": model,
        "data.train.path": data / "sft.jsonl",
        "data.eval.path": data / "sft_eval.jsonl",
        "data.pretrain_mix.path": data / "pretrain.jsonl",
        "train.batch_size": 8,
        "train.micro_batch_size": 8,
        "train.eval_every": 0,
        "train.eval_max_batches": 2,
        "optim.warmup_steps": 2,
    } | {k.replace("__", "."): v for k, v in extra.items()}


def rm_overrides(world: Path, out: Path, model: Path, **extra) -> dict:
    """Overrides for configs/tiny/rm.yaml that point every path into tmp dirs."""
    data = world / "data"
    return {
        "output_dir": out,
        "model.name_or_path": model,
        "data.train.path": data / "comparisons.jsonl",
        "data.eval.path": data / "comparisons_eval.jsonl",
        "data.reference.path": data / "sft.jsonl",
        "data.reference_max_rows": 64,
        "train.batch_size": 4,
        "train.micro_batch_size": 4,
        "train.eval_every": 0,
        "optim.warmup_steps": 2,
        "ensemble.size": 1,  # one plain RM dir (the shipped recipe trains a 2-member ensemble)
        "ensemble.holdout": 0,
    } | {k.replace("__", "."): v for k, v in extra.items()}


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metric_series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


def load_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    files = sorted(Path(path).glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    for f in files:
        tensors |= load_file(str(f))
    return tensors


def train_with_and_without(
    stage: str, yaml_name: str, train, overrides: dict, key: str, tmp_path: Path, monkeypatch, counted: tuple
):
    """Train a shipped tiny YAML twice, `key` false then true, counting the calls of `counted` = (module, function
    name) in each: ([final weights], [train/loss series], [calls]) of the two runs."""
    module, name = counted
    calls, original = [0], getattr(module, name)

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    finals, losses, counts = [], [], []
    for on in (False, True):
        out = tmp_path / f"{key}-{on}"
        cfg = load_stage(stage, yaml_name, overrides | {"output_dir": out, key: on})
        calls[0] = 0
        finals.append(load_safetensors_dir(train(cfg)))
        counts.append(calls[0])
        losses.append([v for _, v in metric_series(read_metrics(out), "train/loss")])
    return finals, losses, counts


def assert_resume_bit_identical(stage: str, yaml_name: str, train, base: dict, tmp_path: Path, steps: int = 6) -> None:
    """An interrupted-and-resumed run reproduces the uninterrupted run's final weights exactly (CPU).

    A: `steps` steps in one go. B: the same run, then `final/` (and every checkpoint but the one at steps/2) is
    removed, as if the process died right after checkpoint-<steps/2>, and the run is restarted with resume=auto.
    """
    half = steps // 2
    common = base | {
        "train.max_steps": steps,
        "checkpoint.every": half,
        "checkpoint.keep_last": 0,
        "logging.every": 1,
        "train.eval_every": half,
    }
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    final_a = train(load_stage(stage, yaml_name, common | {"output_dir": a_dir}))
    final_b = train(load_stage(stage, yaml_name, common | {"output_dir": b_dir}))
    assert (b_dir / f"checkpoint-{half}" / "state").is_dir()
    before = [r for r in read_metrics(b_dir) if r["step"] <= half]
    shutil.rmtree(final_b)
    for ckpt in b_dir.glob("checkpoint-*"):
        if ckpt.name != f"checkpoint-{half}":
            shutil.rmtree(ckpt)
    final_b = train(load_stage(stage, yaml_name, common | {"output_dir": b_dir, "resume": "auto"}))

    wa, wb = load_safetensors_dir(final_a), load_safetensors_dir(final_b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs after resume"

    # metrics.jsonl: no (step, key) twice, and the resumed run logged the same training curve
    rows_a, rows_b = read_metrics(a_dir), read_metrics(b_dir)
    # rows up to the checkpoint are kept as they were (a run restarted from scratch would log them again)
    assert [r for r in rows_b if r["step"] <= half] == before
    seen: dict[str, list[int]] = defaultdict(list)
    for r in rows_b:
        for k in r:
            if k not in ("step", "time"):
                seen[k].append(r["step"])
    for k, steps_logged in seen.items():
        assert len(steps_logged) == len(set(steps_logged)), f"{k} logged twice for a step: {steps_logged}"
    assert sorted(seen["train/loss"]) == list(range(1, steps + 1))
    assert metric_series(rows_a, "train/loss") == metric_series(rows_b, "train/loss")


# --------------------------------------------------------------------------------------------------
# Session fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    from rlhf.tiny import build_tiny_world

    out = tmp_path_factory.mktemp("tiny") / "world"
    build_tiny_world(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_world):
    """The tiny world's word-level tokenizer."""
    from rlhf.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_world / "tokenizer"))


def tiny_llama_config(vocab_size: int, pad_token_id: int, **overrides):
    """The tests' 2-layer Llama shape (d 32, 4 heads, MLP 64, 128 positions) over a vocabulary."""
    from transformers import LlamaConfig

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    shape |= dict(num_key_value_heads=4, max_position_embeddings=128)
    return LlamaConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, **shape | overrides)


@pytest.fixture(scope="session")
def tiny_lm(tokenizer):
    """A 2-layer random Llama over the tiny world's vocabulary (seed 0), in eval mode: for exact-math tests."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(tokenizer), tokenizer.pad_token_id)).eval()


@pytest.fixture(scope="session")
def tiny_value_model(tokenizer):
    """The same shape with a scalar head, as a TokenValueModel (seed 0, eval mode): values and reward scores."""
    from transformers import LlamaForSequenceClassification

    from rlhf.models.heads import TokenValueModel

    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), tokenizer.pad_token_id, num_labels=1)
    return TokenValueModel(LlamaForSequenceClassification(config)).eval()


@pytest.fixture(scope="session")
def tiny_base(tiny_world, tmp_path_factory) -> Path:
    """A base model pretrained from scratch for 60 steps (the sft stage with configs/tiny/pretrain.yaml)."""
    from rlhf.stages import sft

    out = tmp_path_factory.mktemp("pretrain")
    cfg = load_stage(
        "sft",
        "pretrain.yaml",
        {
            "output_dir": out,
            "model.name_or_path": tiny_world / "model_config",
            "model.tokenizer": tiny_world / "tokenizer",
            "data.train.path": tiny_world / "data" / "pretrain.jsonl",
            "data.eval.path": tiny_world / "data" / "pretrain_eval.jsonl",
            "train.max_steps": 60,
            "train.batch_size": 32,
            "train.micro_batch_size": 32,
            "train.eval_every": 30,
            "optim.warmup_steps": 5,
        },
    )
    return sft.train(cfg)


@pytest.fixture(scope="session")
def tiny_sft(tiny_world, tiny_base, tmp_path_factory) -> Path:
    """SFT from tiny_base for 40 steps (10% pretraining mix, as the shipped recipe), eval every 10 steps."""
    from rlhf.stages import sft

    out = tmp_path_factory.mktemp("sft")
    cfg = load_stage(
        "sft",
        "sft.yaml",
        sft_overrides(
            tiny_world,
            out,
            tiny_base,
            train__max_steps=40,
            train__batch_size=32,
            train__micro_batch_size=32,
            train__eval_every=10,
            train__eval_max_batches=0,
            logging__num_samples=2,
            optim__warmup_steps=5,
        ),
    )
    return sft.train(cfg)


def rm_config(tiny_world, tiny_sft, out: Path, extra: list[str] = ()):
    """configs/tiny/rm.yaml shrunk to one plain RM of 40 steps (the recipe trains a 3-member ensemble)."""
    from rlhf.config import load_config

    data = Path(tiny_world) / "data"
    return load_config(
        "rm",
        str(CONFIGS / "tiny" / "rm.yaml"),
        PPO_QUIET
        + [
            f"output_dir={out}",
            f"model.name_or_path={tiny_sft}",
            f"data.train.path={data / 'comparisons.jsonl'}",
            f"data.eval.path={data / 'comparisons_eval.jsonl'}",
            f"data.reference.path={data / 'sft.jsonl'}",
            "data.reference_max_rows=64",
            "train.max_steps=40",
            "train.eval_every=0",
            "checkpoint.every=0",
            "ensemble.size=1",
            "ensemble.holdout=0",
            *extra,
        ],
    )


@pytest.fixture(scope="session")
def tiny_rm(tiny_world, tiny_sft, tmp_path_factory) -> Path:
    from rlhf.stages import reward_model as reward

    return reward.train(rm_config(tiny_world, tiny_sft, tmp_path_factory.mktemp("rm")))


def sft_run_configs(
    tiny_world, tiny_base, tmp_path: Path, names: tuple[str, ...], steps: int, packing: bool = False
) -> dict[str, Path]:
    """One saved SFT YAML per name (output_dir tmp_path/<name>), batch 16 in micro-batches of 8: for subprocesses."""
    from rlhf.config import save_config

    base = sft_overrides(
        tiny_world, tmp_path, tiny_base, train__max_steps=steps, logging__every=1, data__packing=packing
    )
    base |= {"train.batch_size": 16, "train.micro_batch_size": 8, "logging.progress": "off"}
    configs = {}
    for name in names:
        configs[name] = tmp_path / f"{name}.yaml"
        save_config(load_stage("sft", "sft.yaml", base | {"output_dir": tmp_path / name}), configs[name])
    return configs


def torchrun_command(nproc: int = 2) -> tuple[list[str], dict]:
    """The launcher `accelerate launch --multi_gpu` uses, for `nproc` CPU processes (gloo), and its environment."""
    import os
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)], env


def free_port() -> int:
    """A TCP port nothing listens on now (the rendezvous of processes started by hand)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ppo_config(tiny_world, tiny_sft, tiny_rm, out: Path, extra: list[str] = ()):
    """configs/tiny/ppo.yaml shrunk (16 episodes, 2 epochs, 16 new tokens) with every path in tmp dirs."""
    from rlhf.config import load_config

    data = Path(tiny_world) / "data"
    return load_config(
        "ppo",
        str(CONFIGS / "tiny" / "ppo.yaml"),
        PPO_QUIET
        + [
            f"output_dir={out}",
            f"models.policy.name_or_path={tiny_sft}",
            f"models.reward.name_or_path={tiny_rm}",
            f"data.prompts.path={data / 'prompts.jsonl'}",
            "data.eval_prompts.path=",
            f"ptx.data.path={data / 'pretrain.jsonl'}",
            "train.batch_size=16",
            "ppo.mini_batch_size=8",
            "ppo.micro_batch_size=8",
            "ppo.ppo_epochs=2",
            "rollout.max_new_tokens=16",
            "checkpoint.every=0",
            *extra,
        ],
    )


def documented_metric_keys() -> set[str]:
    """The keys docs/metrics.md has a row for (the first column of its tables)."""
    import re

    return set(re.findall(r"^\| `([^`]+)`", (REPO / "docs" / "metrics.md").read_text(), re.M))


def dpo_run_configs(tiny_world, tiny_sft, tmp_path: Path, names: tuple[str, ...], **extra) -> dict[str, Path]:
    """One saved DPO YAML per name (output_dir tmp_path/<name>): 3 steps of 8 prompts in micro-batches of 2 from
    tiny_sft, LR 1e-3 (so 3 steps move the weights), no eval: for 1-process against N-process runs."""
    from rlhf.config import save_config

    sets = {
        "model.name_or_path": tiny_sft,
        "data.train.path": tiny_world / "data" / "comparisons.jsonl",
        "data.eval.path": "",
        "train.max_steps": 3,
        "train.batch_size": 8,
        "train.micro_batch_size": 2,
        "train.eval_every": 0,
        "optim.lr": 1e-3,
        "optim.warmup_steps": 0,
    } | extra
    configs = {}
    for name in names:
        configs[name] = tmp_path / f"{name}.yaml"
        save_config(load_stage("dpo", "dpo.yaml", sets | {"output_dir": tmp_path / name}), configs[name])
    return configs
