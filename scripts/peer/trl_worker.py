"""One TRL run of a `make bench-peer` workload, in the peer venv (.venv-peer, trl==1.12.0) and a fresh process.

TRL is a benchmark peer, never a dependency of rlhf: this file runs only under .venv-peer (or the interpreter that
`bench_peer.py --peer-python` names). Models and the tokenizer come from the local world dir (HF_HUB_OFFLINE=1). A
TrainerCallback stamps the end of every step (PPO: iteration); for PPO the module-level `batch_generation` and
`forward` of TRL's trainer are wrapped to split each iteration into generate / score (rollout forwards, rewards,
advantages) / train. Lengths come from the world's model.json (tiny or small).

--precision bf16 sets `bf16=True` in the TRL config. In transformers' Trainer (SFT, RM) that becomes
Accelerator(mixed_precision="bf16"), which on CPU wraps the prepared model's forward in
torch.autocast("cpu", torch.bfloat16) (+ outputs back to fp32); the weights stay fp32 (nothing casts the model: no
bf16_full_eval here, TRL casts to bf16 only QLoRA adapters), so it is autocast with fp32 master weights, as in rlhf.
TRL 1.12's experimental PPOTrainer builds its own `Accelerator(gradient_accumulation_steps=...)` without passing
mixed_precision, so `bf16=True` alone leaves PPO in fp32; accelerate then reads ACCELERATE_MIXED_PRECISION, which
is what `accelerate launch --mixed_precision bf16` sets, so this worker sets it too. Even then only the prepared
PolicyAndValueWrapper's forward is autocast, i.e. the PPO training forwards: generation (unwrapped .policy), the
rollout's policy/reference/value/reward forwards run fp32. The accelerator's mixed_precision / native_amp and the
policy's parameter dtype are recorded in the result so the parent can check what actually ran.

    .venv-peer/bin/python scripts/peer/trl_worker.py --workload ppo --world runs/bench-peer/world --out DIR --steps 6
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)

# Settings shared by every TRL config (bf16 is set per run, use_cpu by --device): no gradient checkpointing, no
# saving/eval/logging backends.
COMMON = dict(
    seed=0,
    use_cpu=True,
    fp16=False,
    gradient_checkpointing=False,
    gradient_accumulation_steps=1,
    save_strategy="no",
    eval_strategy="no",
    report_to="none",
    disable_tqdm=True,
    dataloader_num_workers=0,
)


class StepClock(TrainerCallback):
    def __init__(self):
        self.begin, self.ends = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.time())


def precision_used(trainer, model) -> dict:
    acc = trainer.accelerator
    return {
        "mixed_precision": str(acc.mixed_precision),
        "native_amp": bool(acc.native_amp),
        "param_dtype": str(next(model.parameters()).dtype),
        "device": str(next(model.parameters()).device),
    }


def run_ppo(
    world: Path, out: Path, steps: int, clock: StepClock, bf16: bool, attn: dict, prompts: str = "prompts.jsonl"
) -> dict:
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as mod

    marks: list[dict] = []
    real_generation, real_forward = mod.batch_generation, mod.forward

    def batch_generation(*a, **k):
        t0 = time.time()
        res = real_generation(*a, **k)
        marks.append({"gen_start": t0, "gen_end": time.time()})
        return res

    def forward(*a, **k):
        if torch.is_grad_enabled() and marks and "train_start" not in marks[-1]:
            marks[-1]["train_start"] = time.time()
        return real_forward(*a, **k)

    mod.batch_generation, mod.forward = batch_generation, forward
    if bf16:  # PPOTrainer's own Accelerator() takes mixed precision only from here (see the module docstring)
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    shape = json.loads((world / "model.json").read_text())

    tok = AutoTokenizer.from_pretrained(world / "lm")
    rows = load_dataset("json", data_files=str(world / "data" / prompts), split="train")
    ds = rows.map(lambda r: {"input_ids": tok(r["prompt"])["input_ids"]}, remove_columns=rows.column_names)
    policy = AutoModelForCausalLM.from_pretrained(world / "lm", dtype=torch.float32, **attn)
    ref = AutoModelForCausalLM.from_pretrained(world / "lm", dtype=torch.float32, **attn)
    reward = AutoModelForSequenceClassification.from_pretrained(
        world / "rm", num_labels=1, dtype=torch.float32, **attn
    )
    value = AutoModelForSequenceClassification.from_pretrained(world / "rm", num_labels=1, dtype=torch.float32, **attn)
    args = PPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=32,  # 32 episodes per iteration (x gradient_accumulation_steps 1)
        num_mini_batches=4,  # minibatch 8 = micro-batch (one forward/backward per optimizer step)
        num_ppo_epochs=4,
        total_episodes=32 * steps,
        local_rollout_forward_batch_size=32,
        response_length=shape["new_tokens"],
        stop_token="eos",  # stop/truncate at EOS, as rlhf does
        temperature=1.0,
        missing_eos_penalty=None,
        kl_coef=0.05,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        learning_rate=3e-6,
        num_sample_generations=0,
        logging_steps=1,
        bf16=bf16,
        **COMMON,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        train_dataset=ds,
        value_model=value,
        callbacks=[clock],
    )
    trainer.train()
    split = {"time/generate": [], "time/score": [], "time/train": []}
    for m, end in zip(marks, clock.ends):
        split["time/generate"].append(m["gen_end"] - m["gen_start"])
        split["time/score"].append(m["train_start"] - m["gen_end"])
        split["time/train"].append(end - m["train_start"])
    eos = [r.get("val/num_eos_tokens") for r in trainer.state.log_history if "val/num_eos_tokens" in r]
    return split | {"eos_tokens": eos} | precision_used(trainer, policy)


def run_grpo(world: Path, out: Path, steps: int, clock: StepClock, bf16: bool, attn: dict) -> dict:
    """TRL's GRPOTrainer in its defaults (one optimizer step per generation batch, num_iterations 1, beta 0: no
    reference model, no old-log-prob forward) with the world's reward model: 8 prompts x 4 completions per step."""
    from trl import GRPOConfig, GRPOTrainer

    shape = json.loads((world / "model.json").read_text())
    tok = AutoTokenizer.from_pretrained(world / "lm")
    ds = load_dataset("json", data_files=str(world / "data" / "prompts.jsonl"), split="train")
    policy = AutoModelForCausalLM.from_pretrained(world / "lm", dtype=torch.float32, **attn)
    reward = AutoModelForSequenceClassification.from_pretrained(
        world / "rm", num_labels=1, dtype=torch.float32, **attn
    )
    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=32,  # completions per step: 8 prompts x num_generations
        num_generations=4,
        max_completion_length=shape["new_tokens"],
        max_steps=steps,
        temperature=1.0,
        beta=0.0,
        num_iterations=1,
        learning_rate=3e-6,
        logging_steps=1,
        bf16=bf16,
        **COMMON,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        reward_processing_classes=tok,
        callbacks=[clock],
    )
    trainer.train()
    return precision_used(trainer, policy)


class TokenCounter:
    """Wraps a data collator: the real (unpadded) tokens of every micro-batch it builds, in order."""

    def __init__(self, collate):
        self.collate, self.tokens = collate, []

    def __call__(self, examples):
        batch = self.collate(examples)
        if "attention_mask" in batch:
            self.tokens.append(int(batch["attention_mask"].sum()))
        elif "input_ids" in batch:  # padding-free: one row of every example back to back, no padding
            self.tokens.append(int(batch["input_ids"].numel()))
        else:  # reward pairs: chosen and rejected
            self.tokens.append(sum(int(batch[k].sum()) for k in batch if k.endswith("attention_mask")))
        return batch


def run_supervised(
    workload: str,
    world: Path,
    out: Path,
    steps: int,
    clock: StepClock,
    bf16: bool,
    compile: bool,
    attn: dict,
    best: bool,
) -> dict:
    """SFT / reward / DPO training. Variable-length workloads (*var): 32 rows per step in micro-batches of 8 (TRL's
    default collation, padding to each micro-batch's longest row); `best`: SFT packed (TRL's best-fit-decreasing
    packing, padding-free) in micro-batches of 8 packed sequences and 2 accumulation steps (~40 rows)."""
    var = workload.endswith("var")
    files = {"sft": "sft_trl", "rm": "pairs_trl", "rmk4": "ranked4_trl", "dpo": "pairs_trl"}
    files |= {"sftvar": "sft_var_trl", "rmvar": "pairs_var_trl", "rmk4var": "ranked4_var_trl"}
    files |= {"dpovar": "pairs_var_trl"}
    ds = load_dataset("json", data_files=str(world / "data" / (files[workload] + ".jsonl")), split="train")
    tok = AutoTokenizer.from_pretrained(world / "lm")
    common = COMMON | dict(
        output_dir=str(out),
        max_steps=steps,
        learning_rate=1e-5,
        logging_strategy="no",
        max_length=json.loads((world / "model.json").read_text())["seq_len"],
        bf16=bf16,
        torch_compile=compile,  # Trainer: accelerate's dynamo plugin compiles the prepared model (inductor)
    )
    if var:
        common["gradient_accumulation_steps"] = 2 if best and workload == "sftvar" else 4
    if workload.startswith("sft"):
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(world / "lm", dtype=torch.float32, **attn)
        packing = dict(packing=True, packing_strategy="bfd") if best else dict(packing=False, padding_free=False)
        args = SFTConfig(per_device_train_batch_size=8, **packing, **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[clock])
    elif workload.startswith("dpo"):
        from trl import DPOConfig, DPOTrainer

        # defaults: sigmoid loss, the reference a frozen copy of the model (ref_model=None), chosen and rejected in
        # one concatenated forward padded to the micro-batch's longest (padding_free is disabled in TRL 1.12)
        model = AutoModelForCausalLM.from_pretrained(world / "lm", dtype=torch.float32, **attn)
        args = DPOConfig(per_device_train_batch_size=8, beta=0.1, **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[clock])
    else:
        from trl import RewardConfig, RewardTrainer

        # the LM's weights with a new scalar head, as rlhf's RM stage starts from an LM
        model = AutoModelForSequenceClassification.from_pretrained(
            world / "lm", num_labels=1, dtype=torch.float32, **attn
        )
        model.config.pad_token_id = tok.pad_token_id
        pairs = {"rm": 8, "rmk4": 48, "rmvar": 8, "rmk4var": 48}[workload]  # rmk4: the 6 pairs of each of 8 prompts
        args = RewardConfig(per_device_train_batch_size=pairs, **common)
        trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[clock])
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    sample = trainer.train_dataset[0]
    keys = ("input_ids", "prompt_ids", "chosen_ids", "rejected_ids")
    lengths = {k: len(sample[k]) for k in keys if k in sample}
    trainer.train()
    accumulate = args.gradient_accumulation_steps
    tokens = [sum(counter.tokens[i : i + accumulate]) for i in range(0, len(counter.tokens), accumulate)]
    if workload == "rmk4var":  # unique tokens: each response of a 4-way list is in 3 of its 6 pairs
        tokens = [t / 3 for t in tokens]
    return {"tokenized_lengths": lengths, "tokens": tokens[: len(clock.ends)]} | precision_used(trainer, model)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--workload",
        choices=["ppo", "sft", "rm", "rmk4", "ppovar", "grpo", "sftvar", "rmvar", "rmk4var", "dpo", "dpovar"],
        required=True,
    )
    ap.add_argument("--best", action="store_true", help="TRL's fastest configuration for the workload (SFT: packing)")
    ap.add_argument("--world", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True, help="total steps / iterations, the first is warm-up")
    ap.add_argument("--result", required=True, help="JSON file to write")
    ap.add_argument("--precision", choices=["no", "bf16"], default="no", help="bf16 = TRL's bf16=True (no = fp32)")
    ap.add_argument("--compile", action="store_true", help="torch_compile=True (SFT, RM; TRL's PPO has no such path)")
    ap.add_argument("--attn", default="", help="attn_implementation of every model (default: transformers')")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: use_cpu=False")
    args = ap.parse_args()
    COMMON["use_cpu"] = args.device == "cpu"
    bf16 = args.precision == "bf16"
    attn = {"attn_implementation": args.attn} if args.attn else {}
    out, world = Path(args.out), Path(args.world)
    shutil.rmtree(out, ignore_errors=True)
    clock = StepClock()
    t0 = time.time()
    if args.workload.startswith("ppo"):
        if args.compile:
            raise SystemExit("TRL 1.12's PPOTrainer builds its own Accelerator without a dynamo plugin: no compile")
        prompts = "prompts_var.jsonl" if args.workload == "ppovar" else "prompts.jsonl"
        extra = run_ppo(world, out, args.steps, clock, bf16, attn, prompts)
    elif args.workload == "grpo":
        if args.compile:
            raise SystemExit("grpo: compile is not measured")
        extra = run_grpo(world, out, args.steps, clock, bf16, attn)
    else:
        extra = run_supervised(args.workload, world, out, args.steps, clock, bf16, args.compile, attn, args.best)
    result = {
        "side": "trl",
        "workload": args.workload,
        "steps": len(clock.ends),
        "train_begin": clock.begin,
        "step_end_times": clock.ends,
        "threads": torch.get_num_threads(),
        "wall_s": time.time() - t0,
    } | extra
    if torch.cuda.is_initialized():  # what the tensors took at their peak (the caching allocator's reserve aside)
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(args.result).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
