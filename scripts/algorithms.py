"""`make algorithms`: the lineage side by side on the tiny world, judged by its gold judge (docs/algorithms.md).

1. the tiny world, pretraining, SFT and the reward model as in the demo (skipped when runs/tiny has them);
2. one run per option from the same SFT policy: PPO with GAE (the recipe), REINFORCE with a learned and with a
   batch-mean baseline, RLOO and GRPO (4 samples per prompt), PPO with L^KLPEN, DPO, and PPO with the gold
   judge itself as the reward function (the upper bound: no reward model to over-optimise);
3. `rlhf eval` of each final policy against SFT (gold score, win-rate, KL to SFT, distinct-2), then a table.

Every PPO option keeps the recipe's settings (configs/tiny/ppo.yaml: 100 iterations of 64 responses, beta 0.2,
ptx 0.5); only the lines that select the option change. Each step is skipped when its output exists, so an
interrupted script resumes. `ITERATIONS=N` shortens every PPO run.
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

RUN = Path("runs/algorithms")
ITERATIONS = os.environ.get("ITERATIONS")
GROUP = ["rollout.samples_per_prompt=4"]  # 64 responses = 16 prompts x 4
OPTIONS = {
    "PPO-GAE (the recipe)": [],
    "REINFORCE + learned baseline": ["ppo.advantage=reinforce", "ppo.baseline=value"],
    "REINFORCE + batch-mean baseline": ["ppo.advantage=reinforce", "ppo.baseline=mean"],
    "RLOO (k=4)": ["ppo.advantage=rloo"] + GROUP,
    # GRPO's own KL: k3 as a loss term with the paper's beta 0.04 (DeepSeekMath)
    "GRPO (k=4, KL in the loss)": ["ppo.advantage=grpo", "kl.placement=loss", "kl.kl_coef=0.04"] + GROUP,
    "PPO with L^KLPEN": ["ppo.objective=klpen"],
    # the gold judge scores in [0, 1]: normalised by running moments like a reward model's unit-scale scores
    "PPO, gold judge as reward (upper bound)": [
        "reward.function=rlhf.tiny:gold_judge",
        "models.reward.name_or_path=",
        "models.value_init=policy",
        "reward.normalize=true",
    ],
}
QUIET = ["logging.progress=lines", "checkpoint.every=0", "data.eval_prompts.path="]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def train(name: str, extra: list[str]) -> tuple[Path, float]:
    """The option's final policy dir and its training wall time (measured once, recorded next to it)."""
    out = RUN / slug(name)
    final, timing = out / "final", out / "wall_time.json"
    if not final.is_dir():
        start = time.time()
        if name == "DPO":
            run_stage("dpo", "configs/tiny/dpo.yaml", [f"output_dir={out}", "logging.progress=lines"])
        else:
            steps = [f"train.max_steps={ITERATIONS}"] if ITERATIONS else []
            run_stage("ppo", "configs/tiny/ppo.yaml", [f"output_dir={out}"] + QUIET + steps + extra)
        timing.write_text(json.dumps({"seconds": time.time() - start}))
    return final, json.loads(timing.read_text())["seconds"]


def evaluate(name: str, policy: Path) -> dict:
    out = RUN / slug(name) / "eval"
    if not (out / "eval.json").exists():
        run_stage(
            "eval",
            "configs/tiny/eval.yaml",
            [f"output_dir={out}", f"policy={policy}", "run_dir=", "select_best=false", "pretrain_eval.path="],
        )
    return json.loads((out / "eval.json").read_text())


if __name__ == "__main__":
    quiet_hf_progress()
    start = time.time()
    recipe = RUN / "recipe"  # the demo's first stages (each skipped when runs/tiny already has it)
    recipe.mkdir(parents=True, exist_ok=True)
    for stage in ("world", "pretrain", "sft", "rm"):
        shutil.copy(Path("configs/tiny") / f"{stage}.yaml", recipe / f"{stage}.yaml")
    run_pipeline(str(recipe))
    rows = []
    for name, extra in list(OPTIONS.items()) + [("DPO", [])]:
        final, seconds = train(name, extra)
        result = evaluate(name, final)
        rows.append(
            {
                "option": name,
                "gold": result["gold_score_policy"],
                "sft gold": result["gold_score_sft"],
                "win-rate vs SFT": result["win_rate"],
                "KL to SFT": result["kl_to_sft"],
                "distinct-2": result["distinct2_policy"],
                "train wall s": round(seconds),
            }
        )
    for row in rows:
        print(json.dumps(row))
    print(f"wall time: {time.time() - start:.0f} s", file=sys.stderr)
