"""`make kl-control`: every KL controller on dynamics it was not tuned on (docs/overoptimization.md).

1. the simulated harness (rlhf.tools.kl_scenarios): slow start then take-off, fast start, an exploit that appears
   mid-run, noisy KL (and a very noisy stress row), each from beta_0 in {0.001, 0.05, 1}, 5 noise seeds;
2. real tiny PPO runs (the demo's tiny world, pretraining and SFT; built when runs/tiny lacks them) for each
   controller on (a) a slow start — the learning rate warmed up over the first third of the run, and a reward
   whose exploit (repeating words) must be found — and (b) a policy fast from the first iteration (no warm-up,
   beta_0 50x below what holds the target). Reported: the batch KL over the second half against the target.

Every PPO run is skipped when its final/ exists, so an interrupted script resumes. ITERATIONS=N shortens it.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

from rlhf.runtime.tracking import quiet_hf_progress
from rlhf.stages.pipeline import run_pipeline
from rlhf.stages.registry import run_stage
from rlhf.tools.kl_scenarios import format_table, kl_harness_table

RUN = Path("runs/kl_control")
ITERATIONS = int(os.environ.get("ITERATIONS", "120"))
TARGET = 3.0
COMMON = [
    f"train.max_steps={ITERATIONS}",
    "kl.adaptive=true",
    f"kl.target={TARGET}",
    "reward.function=rlhf.tools.kl_scenarios:repetition_exploit",
    "reward.model_weight=0.0",
    "ptx.ptx_coef=0",
    "checkpoint.every=0",
    "data.eval_prompts.path=",
    "logging.progress=lines",
    "logging.num_samples=0",
]
CASES = {
    "slow_start": ["optim.lr=1e-4", f"optim.warmup_steps={ITERATIONS // 3}", "optim.warmup_start_ratio=0.0"]
    + ["kl.kl_coef=0.05"],
    "fast_start": ["optim.lr=3e-4", "optim.warmup_steps=0", "kl.kl_coef=0.001"],
}
CONTROLLERS = ("antiwindup", "pi", "proportional")


def sft_and_rm_first() -> None:
    """The demo's world, pretraining, SFT and RM (the PPO config's value model starts from the RM)."""
    recipe = RUN / "recipe"
    recipe.mkdir(parents=True, exist_ok=True)
    for name in ("world.yaml", "pretrain.yaml", "sft.yaml", "rm.yaml"):
        shutil.copy(Path("configs/tiny") / name, recipe / name)
    run_pipeline(str(recipe))


def second_half(name: str) -> dict:
    rows = [json.loads(line) for line in (RUN / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    kl = [r["objective/kl"] for r in rows if "objective/kl" in r]
    half = kl[len(kl) // 2 :]
    mean = sum(half) / len(half)
    return {
        "run": name,
        "second-half mean KL": round(mean, 2),
        "vs target": f"{mean / TARGET - 1:+.0%}",
        "max": round(max(half), 2),
        "above 1.5x": f"{sum(k > 1.5 * TARGET for k in half) / len(half):.0%}",
        "peak KL (iteration)": f"{max(kl):.2f} ({kl.index(max(kl)) + 1})",
        "final beta": round([r["objective/kl_coef"] for r in rows if "objective/kl_coef" in r][-1], 4),
    }


if __name__ == "__main__":
    quiet_hf_progress()
    start = time.time()
    print(format_table(kl_harness_table()), flush=True)
    sft_and_rm_first()
    results = []
    for case, extra in CASES.items():
        for controller in CONTROLLERS:
            name = f"{case}_{controller}"
            if not (RUN / name / "final").is_dir():
                args = COMMON + extra + [f"kl.controller={controller}", f"output_dir={RUN / name}"]
                run_stage("ppo", "configs/tiny/ppo.yaml", args)
            results.append(second_half(name))
    for row in results:
        print(json.dumps(row))
    print(f"wall time: {time.time() - start:.0f} s", file=sys.stderr)
