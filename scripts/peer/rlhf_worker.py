"""One rlhf run of a `make bench-peer` workload, in rlhf's own .venv and a fresh process.

Drives rlhf through its public code path (load_config + the stage's train(), with --set style overrides), so any
later optimisation of rlhf is measured as is. Lengths come from the world's model.json (tiny or small); --precision
bf16 sets train.mixed_precision=bf16 (accelerate's bf16 autocast around every forward, generation included, with
fp32 master weights: model.dtype stays float32). Step timestamps come from metrics.jsonl (one row per step,
logging.every=1); the parent turns them into per-step times, skipping step 1 (warm-up).

    python scripts/peer/rlhf_worker.py --workload ppo --world runs/bench-peer/world --out DIR --steps 6 \
        [--precision bf16]
"""

import argparse
import json
import shutil
import time
from pathlib import Path

COMMON = [
    "seed=0",
    "resume=never",
    "train.cpu=true",
    "train.eval_every=0",
    "checkpoint.every=0",
    "logging.every=1",
    "logging.progress=off",
    "logging.tensorboard=false",
    "logging.num_samples=0",
]


def overrides(workload: str, world: Path, out: Path, steps: int, precision: str) -> tuple[str, list[str]]:
    data = world / "data"
    shape = json.loads((world / "model.json").read_text())
    prompt_len, seq_len, new_tokens = shape["prompt_len"], shape["seq_len"], shape["new_tokens"]
    common = COMMON + [f"train.mixed_precision={precision}"]
    fmt = ["format.prompt_template='{prompt}'", "format.use_chat_template=never", "format.truncation=error"]
    if workload.startswith("ppo") or workload == "grpo":
        ppo_sets = common + [
            f"output_dir={out}",
            f"models.policy.name_or_path={world / 'lm'}",
            f"models.reward.name_or_path={world / 'rm'}",
            "models.value_init=reward",
            "models.reference=copy",
            f"data.prompts.path={data / ('prompts_var.jsonl' if workload == 'ppovar' else 'prompts.jsonl')}",
            "data.eval_prompts.path=",
            *[f"data.{f}" for f in fmt],
            f"data.format.max_length={prompt_len + new_tokens}",
            f"data.format.max_prompt_length={prompt_len}",
            f"rollout.max_new_tokens={new_tokens}",
            "rollout.temperature=1.0",
            "rollout.generation_batch_size=32",
            "rollout.missing_eos_penalty=null",
            "kl.kl_coef=0.05",
            "kl.adaptive=false",
            "kl.estimator=k1",
            "ppo.ppo_epochs=4",
            "ppo.mini_batch_size=8",
            "ppo.micro_batch_size=8",
            "ppo.cliprange=0.2",
            "ppo.cliprange_value=0.2",
            "ppo.vf_coef=0.1",
            "ptx.ptx_coef=0.0",
            "ema.decay=0.0",
            f"train.max_steps={steps}",
            "train.batch_size=32",
            "optim.lr=3e-6",
            "optim.warmup_steps=0",
            "optim.max_grad_norm=0",  # TRL's PPO loop does not clip gradients
        ]
        if workload == "grpo":  # TRL's GRPO defaults: one step per generation batch, beta 0 (no reference)
            ppo_sets += [
                "ppo.advantage=grpo",
                "rollout.samples_per_prompt=4",
                "kl.kl_coef=0",
                "models.reference=none",
                "ppo.ppo_epochs=1",
                "ppo.mini_batch_size=32",
                "ppo.micro_batch_size=32",  # TRL: the 32 completions in one forward and backward
                "optim.max_grad_norm=1.0",  # the Trainer's default clipping, which TRL's GRPO keeps
            ]
        return "ppo", ppo_sets
    model = f"model.name_or_path={world / 'lm'}"
    supervised = [f"output_dir={out}", model, f"train.max_steps={steps}", "train.batch_size=8"]
    supervised += ["train.micro_batch_size=8", "optim.lr=1e-5", "optim.warmup_steps=0"]
    supervised += [f"data.{f}" for f in fmt] + [f"data.format.max_length={seq_len}"]
    supervised += [f"data.format.max_prompt_length={prompt_len}"]
    var = workload.endswith("var")
    if var:  # variable lengths: 32 rows per step in micro-batches of 8 (8 packed sequences with data.packing)
        supervised = [s for s in supervised if not s.startswith("train.batch_size")] + ["train.batch_size=32"]
    if workload.startswith("sft"):
        return "sft", common + supervised + [
            "data.kind=sft",
            f"data.train.path={data / ('sft_var.jsonl' if var else 'sft.jsonl')}",
            "data.eval.path=",
            "data.mask_prompt=true",
            "data.pretrain_mix_ratio=0.0",
        ]
    if workload.startswith("dpo"):  # the DPO paper's beta; the reference a frozen copy of the starting LM (as TRL's)
        return "dpo", common + supervised + [
            f"data.train.path={data / ('pairs_var.jsonl' if var else 'pairs.jsonl')}",
            "data.eval.path=",
            "reference=copy",
            "beta=0.1",
        ]
    train = {"rm": "pairs", "rmk4": "ranked4", "rmvar": "pairs_var", "rmk4var": "ranked4_var"}[workload] + ".jsonl"
    return "rm", common + supervised + [
        f"data.train.path={data / train}",
        "data.eval.path=",
        "data.reference.path=",
        "ensemble.size=1",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--workload",
        choices=["ppo", "sft", "rm", "rmk4", "ppovar", "grpo", "sftvar", "rmvar", "rmk4var", "dpo", "dpovar"],
        required=True,
    )
    ap.add_argument("--world", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True, help="total steps / iterations, the first is warm-up")
    ap.add_argument("--result", required=True, help="JSON file to write")
    ap.add_argument("--precision", choices=["no", "bf16"], default="no", help="train.mixed_precision (no = fp32)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    ap.add_argument("--attn", default="", help="attn_implementation of every model (default: rlhf's auto)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: train.cpu=false")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)

    import torch

    from rlhf.config import load_config
    from rlhf.stages import dpo, ppo, sft
    from rlhf.stages import reward_model as reward

    stage, sets = overrides(args.workload, Path(args.world), out, args.steps, args.precision)
    if args.attn:  # the value model and the reference are built from these two
        roles = ["models.policy", "models.reward"] if stage == "ppo" else ["model"]
        sets += [f"{role}.attn_implementation={args.attn}" for role in roles]
    if args.device == "cuda":
        sets.append("train.cpu=false")
    cfg = load_config(stage, None, sets + args.set)
    t0 = time.time()
    {"ppo": ppo.train, "sft": sft.train, "rm": reward.train, "dpo": dpo.train}[stage](cfg)
    wall = time.time() - t0
    from accelerate.state import AcceleratorState

    state = AcceleratorState()  # the process-wide state the stage's Accelerator set up
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    key = "time/iteration" if stage == "ppo" else "lr"  # rows of training steps (not evaluation rows)
    rows = [r for r in rows if key in r]
    result = {
        "side": "rlhf",
        "workload": args.workload,
        "steps": len(rows),
        "step_end_times": [r["time"] for r in rows],
        "threads": torch.get_num_threads(),
        "wall_s": wall,
        "train_start": t0,
        "mixed_precision": str(state.mixed_precision),
        "param_dtype": f"torch.{(cfg.models.policy if stage == 'ppo' else cfg.model).dtype}",  # the load dtype
        "device": str(state.device),
    }
    if state.device.type == "cuda":  # what the tensors took at their peak (the caching allocator's reserve aside)
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if stage != "ppo":  # the real (unpadded) tokens of each step
        result["tokens"] = [r["tokens"] for r in rows]
    if stage == "ppo":
        for k in ("time/generate", "time/score", "time/train", "time/iteration"):
            result[k] = [r[k] for r in rows]
        result["eos_share"] = [r.get("rollout/eos_share") for r in rows]
    Path(args.result).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
