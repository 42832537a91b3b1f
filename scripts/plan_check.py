"""Check `rlhf plan`'s memory estimate against measurement on CPU.

For each case a fresh subprocess builds the models with the stages' own code (rlhf.models.loading.load_causal_lm,
rlhf.runtime.optim.build_optimizer, rlhf.stages.sft.sft_loss; PPO: rlhf.stages.ppo.PPOTrainer and one rollout +
update), runs a few optimizer steps on micro-batches of exactly the planned length, and reports its peak resident
memory above the resident memory just before the models were built:

    measured = VmHWM at the end - VmRSS before the models are built,   with VmHWM reset (/proc/self/clear_refs = 5)
               at that moment (fallback: ru_maxrss - VmRSS), everything in one process of 2 threads, after a
               warm-up step of a throwaway 2-layer model (so first-touch library pages are not counted) and with
               MALLOC_MMAP_THRESHOLD_=131072 (freed tensors go back to the kernel instead of glibc's cache).

This is the most honest CPU number available, and it is not the allocator-exact number a GPU reports: RSS includes
glibc's cached free blocks and fragmentation, thread arenas, lazily-touched pages of libraries first used during
training, and misses memory the estimate counts but the kernel never paged in. The estimate is an upper-bound-style
sum (static memory + every activation of the micro-batch alive at once), so it should land above or near the
measurement. Run: `.venv/bin/python scripts/plan_check.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 1024**2
LLAMA_30M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# The measuring child
# --------------------------------------------------------------------------------------------------


def warm_up() -> None:
    """One forward/backward/AdamW step of a throwaway 2-layer Llama, so the library code pages and thread pools
    that the first training step touches are resident before the baseline is taken (they are not model memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    )
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=True, pad_token_id=0)
    del model, opt


def measure_sft(case: dict) -> dict:
    import torch
    from accelerate import Accelerator

    from rlhf.config import load_config
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.runtime.optim import build_optimizer
    from rlhf.stages.sft import sft_loss

    cfg = load_config("sft", case["config"], case["overrides"])
    tokenizer = load_tokenizer(cfg.model)
    micro, seq = cfg.train.micro_batch_size, cfg.data.format.max_length
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(case["steps"]):
        ids = torch.randint(5, len(tokenizer), (micro, seq), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    acc = Accelerator(cpu=True, mixed_precision="no")
    warm_up()
    base = _rss()
    reset = _reset_peak()
    model = load_causal_lm(cfg.model, tokenizer)
    model.train()
    opt = build_optimizer(model.parameters(), cfg.optim)
    model, opt = acc.prepare(model, opt)
    for batch in batches:
        loss_sum, _ = sft_loss(model, batch)
        acc.backward(loss_sum / batch["input_ids"].numel())
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = _hwm() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"measured": peak - base, "baseline": base, "hwm_reset": reset}


def measure_ppo(case: dict) -> dict:
    import inspect

    from rlhf.config import load_config
    from rlhf.stages.ppo import PPOTrainer

    cfg = load_config("ppo", case["config"], case["overrides"])
    warm_up()
    base = _rss()
    reset = _reset_peak()
    trainer = PPOTrainer(cfg, case["config"])
    arg = 0 if "step" in inspect.signature(trainer.rollout).parameters else trainer.batch_rows(0)
    ro, _ = trainer.rollout(arg)
    trainer.compute_advantages(ro)
    trainer.learner.update(ro, 0)
    peak = _hwm() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    P = ro.prompt_width
    R = ro.query_responses.shape[1] - P
    return {"measured": peak - base, "baseline": base, "hwm_reset": reset, "prompt_width": P, "response_width": R}


def child(spec: str) -> None:
    import torch

    case = json.loads(spec)
    torch.set_num_threads(1 if case.get("fsdp") else 2)
    out = measure_ppo(case) if case["stage"] == "ppo" else measure_sft(case)
    print("RESULT " + json.dumps(out | {"rank": int(os.environ.get("RANK", "0"))}), flush=True)


# --------------------------------------------------------------------------------------------------
# The parent: prepare models, run the children, estimate, compare
# --------------------------------------------------------------------------------------------------


# the launch `accelerate launch --config_file configs/accelerate/fsdp.yaml` exports
FSDP2_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
}


def run_child(case: dict) -> dict:
    """One measurement in a fresh process (or, for an FSDP2 case, one per rank under torchrun): the largest rank's."""
    # a fixed mmap threshold: glibc hands blocks >= 128 KiB (every tensor that matters) back to the kernel when they
    # are freed, instead of raising the threshold and caching them, so RSS follows live tensor memory more closely
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "2"}
    launcher = [sys.executable]
    if case.get("fsdp"):
        env |= FSDP2_ENV | {"OMP_NUM_THREADS": "1"}
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(case["fsdp"])]
    proc = subprocess.run(
        launcher + [__file__, "--child", json.dumps(case)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env=env,
    )
    results = [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not results:
        raise RuntimeError(f"measurement of {case['name']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    peak = max(results, key=lambda r: r["measured"])
    return peak | {"per_rank": {r["rank"]: r["measured"] for r in results}}


def save_random_models(config_dir: Path, out: Path) -> tuple[Path, Path]:
    """A random causal LM (policy / reference) and a scalar-head model (reward / value init) of that config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(config_dir)
    lm_dir, rm_dir = out / "policy", out / "reward"
    AutoModelForCausalLM.from_config(config).save_pretrained(lm_dir)
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(rm_dir)
    return lm_dir, rm_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-ppo", action="store_true", help="skip the PPO cases")
    parser.add_argument("--fsdp", type=int, default=2, help="ranks of the FSDP2 PPO case (0: skip it)")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    from rlhf.config import load_config
    from rlhf.tiny import build_tiny_world
    from rlhf.tools.plan import load_shape, plan_ppo, plan_sft

    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="plan_check_"))
    world = tmp / "world"
    build_tiny_world(world, seed=0)
    llama = tmp / "llama30m"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps(LLAMA_30M))
    data = world / "data"
    quiet = ["logging.progress=off", "logging.tensorboard=false", "train.mixed_precision=no", "train.cpu=true"]
    sft_yaml = str(REPO / "configs" / "tiny" / "sft.yaml")
    sft_common = quiet + [
        f"data.train.path={data / 'sft.jsonl'}",
        f"data.pretrain_mix.path={data / 'pretrain.jsonl'}",
        f"model.tokenizer={world / 'tokenizer'}",
        "model.from_config=true",
        f"output_dir={tmp / 'out'}",
    ]
    cases = [
        {
            "name": "tiny world SFT (sft.yaml: micro 64 x 64 tokens)",
            "stage": "sft",
            "config": sft_yaml,
            "overrides": sft_common + [f"model.name_or_path={world / 'model_config'}"],
        },
        {
            "name": "Llama 512x8 SFT (micro 8 x 256)",
            "stage": "sft",
            "config": sft_yaml,
            "overrides": sft_common
            + [f"model.name_or_path={llama}", "train.micro_batch_size=8", "data.format.max_length=256"],
        },
        {
            "name": "Llama 512x8 SFT, grad. checkpointing",
            "stage": "sft",
            "config": sft_yaml,
            "overrides": sft_common
            + [
                f"model.name_or_path={llama}",
                "train.micro_batch_size=8",
                "data.format.max_length=256",
                "model.gradient_checkpointing=true",
            ],
        },
    ]
    if not args.no_ppo:
        lm_dir, rm_dir = save_random_models(llama, tmp / "models")
        tok = world / "tokenizer"
        ppo_case = {
            "name": "Llama 512x8 PPO, 1 iteration, 2 minibatches",
            "stage": "ppo",
            "config": str(REPO / "configs" / "tiny" / "ppo.yaml"),
            "overrides": quiet
            + [
                f"output_dir={tmp / 'ppo'}",
                f"models.policy.name_or_path={lm_dir}",
                f"models.policy.tokenizer={tok}",
                f"models.reward.name_or_path={rm_dir}",
                f"models.reward.tokenizer={tok}",
                f"data.prompts.path={data / 'prompts.jsonl'}",
                "data.eval_prompts.path=",
                "ptx.ptx_coef=0",
                f"ptx.data.path={data / 'pretrain.jsonl'}",
                "rollout.max_new_tokens=32",
                "rollout.generation_batch_size=16",
                "train.batch_size=16",
                "ppo.mini_batch_size=8",  # 2 steps: AdamW state + activations together
                "ppo.micro_batch_size=8",
                "ppo.ppo_epochs=1",
            ],
        }
        cases.append(ppo_case)
        if args.fsdp > 1:  # the same iteration with every role sharded over the ranks; the largest rank's peak
            fsdp_quiet = [o for o in ppo_case["overrides"] if o != "train.cpu=true"]
            cases.append(ppo_case | {"name": f"the same, FSDP2 x {args.fsdp} ranks (per rank)", "fsdp": args.fsdp})
            cases[-1]["overrides"] = fsdp_quiet + [f"output_dir={tmp / 'ppo_fsdp'}", "ppo.micro_batch_size=4"]

    rows = []
    for case in cases:
        for i, c in enumerate(case["overrides"]):
            case["overrides"][i] = str(c)
        case["steps"] = args.steps
        t0 = time.time()
        got = run_child(case)
        cfg = load_config(case["stage"], case["config"], case["overrides"])
        if case["stage"] == "sft":
            plan = plan_sft(cfg, load_shape(cfg.model), mixed_precision="no")
        else:
            # plan at the widths the iteration really had (prompts are shorter than max_prompt_length)
            cfg.data.format.max_prompt_length = got["prompt_width"]
            cfg.rollout.max_new_tokens = got["response_width"]
            shape = load_shape(cfg.models.policy)
            rm_shape = load_shape(cfg.models.reward, "models.reward")
            ranks, topology = (case["fsdp"], "fsdp") if case.get("fsdp") else (1, "ddp")
            plan = plan_ppo(cfg, shape, rm_shape, 1, ranks, topology, mixed_precision="no")
        est, meas = plan.total, got["measured"]
        rows.append((case["name"], plan.static, plan.peak_phase[1], est, meas, (est - meas) / meas, time.time() - t0))
        print(f"[plan_check] {case['name']}: estimate {est / MiB:.1f} MiB, measured {meas / MiB:.1f} MiB", flush=True)

    head = f"{'case':<48} {'static':>8} {'transient':>9} {'estimate':>9} {'measured':>9} {'error':>7} {'time':>6}"
    print(head)
    print("-" * len(head))
    for name, static, trans, est, meas, err, secs in rows:
        print(
            f"{name:<48} {static / MiB:>8.1f} {trans / MiB:>9.1f} {est / MiB:>9.1f} {meas / MiB:>9.1f} "
            f"{err:>+7.1%} {secs:>5.0f}s"
        )
    print("MiB; error = (estimate - measured) / measured; measured = peak RSS above RSS before the models were built")
    print(f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
