"""`make overopt`: reward over-optimisation on the tiny world, with and without the mitigations.

See docs/overoptimization.md for the results.

1. the tiny world, pretraining and SFT as in the demo (skipped when runs/tiny has them);
2. a reward-model ensemble: 3 members on bootstrap resamples, member-2 held out as the proxy;
3. baseline: a long PPO run at a low fixed beta against member-0 alone;
4. mitigated: the same run with a KL target (PI controller), a KL budget and the conservative ensemble
   reward mean - std over members 0 and 1; and each mitigation alone (kl_target_only, ensemble_only);
5. `rlhf eval` over both run dirs (the frontier; gold judge = the tiny world's, proxy = member-2), then a table.

Every step is skipped when its output exists, so an interrupted script resumes. `ITERATIONS=N` shortens it.
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

RUN = Path("runs/overopt")
ITERATIONS = int(os.environ.get("ITERATIONS", "300"))
TARGET_KL = 6.0  # kl.target's default (nats per sequence), not tuned on the gold judge
COMMON_PPO = [
    f"train.max_steps={ITERATIONS}",
    "kl.kl_coef=0.01",
    "ptx.ptx_coef=0",
    "checkpoint.every=25",
    "checkpoint.keep_last=0",
    "train.eval_every=0",
    "data.eval_prompts.path=",
    "logging.progress=lines",
]
KL_TARGET = ["kl.adaptive=true", f"kl.target={TARGET_KL}", f"kl.budget={2 * TARGET_KL}"]
ENSEMBLE = [f"models.reward.name_or_path={RUN}/rm/final", "reward.aggregate=mean_minus_std", "reward.std_coef=1.0"]
RUNS = {
    "baseline": [f"models.reward.name_or_path={RUN}/rm/member-0/final"],
    "kl_target_only": [f"models.reward.name_or_path={RUN}/rm/member-0/final"] + KL_TARGET,
    "ensemble_only": ENSEMBLE,
    "mitigated": ENSEMBLE + KL_TARGET,
}


def sft_first() -> None:
    recipe = RUN / "recipe"
    recipe.mkdir(parents=True, exist_ok=True)
    for name in ("world.yaml", "pretrain.yaml", "sft.yaml"):
        shutil.copy(Path("configs/tiny") / name, recipe / name)
    run_pipeline(str(recipe))


def frontier(name: str) -> dict:
    out = RUN / name / "eval"
    if not (out / "eval.json").exists():
        run_stage(
            "eval",
            "configs/tiny/eval.yaml",
            [
                f"output_dir={out}",
                f"run_dir={RUN / name / 'ppo'}",
                f"reward_model={RUNS[name][0].split('=', 1)[1]}",
                f"proxy_reward_model={RUN}/rm/member-2/final",
                "select_best=false",
                "pretrain_eval.path=",
            ],
        )
    return json.loads((out / "frontier.json").read_text())


def summary(name: str, report: dict) -> dict:
    rows = report["rows"]
    peak = max(rows, key=lambda r: r["gold_score"])
    best = next((r for r in rows if report["best"] and r["name"] == report["best"]["name"]), None)
    end = rows[-1]
    picked = f"{best['gold_score']:.3f} ({best['kl_to_sft']:.1f}, {best['name']})" if best else "none: all flagged"
    return {
        "run": name,
        "sft gold": report["sft"]["gold_score"],
        "peak gold (KL, where)": f"{peak['gold_score']:.3f} ({peak['kl_to_sft']:.1f}, {peak['name']})",
        "end gold (KL)": f"{end['gold_score']:.3f} ({end['kl_to_sft']:.1f})",
        "best-by-proxy gold (KL, where)": picked,
        "end distinct-2": end["distinct2"],
        "end repeat share": end["repeat_share"],
        "flagged": ", ".join(report["excluded"]) or "none",
    }


if __name__ == "__main__":
    quiet_hf_progress()
    start = time.time()
    sft_first()
    if not (RUN / "rm" / "final").is_dir():
        run_stage(
            "rm",
            "configs/tiny/rm.yaml",
            [f"output_dir={RUN}/rm", "ensemble.size=3", "ensemble.holdout=1", "ensemble.bootstrap=true"],
        )
    for name, extra in RUNS.items():
        if not (RUN / name / "ppo" / "final").is_dir():
            run_stage("ppo", "configs/tiny/ppo.yaml", COMMON_PPO + [f"output_dir={RUN / name / 'ppo'}"] + extra)
    table = [summary(name, frontier(name)) for name in RUNS]
    for row in table:
        print(json.dumps(row))
    print(f"plots: {', '.join(str(RUN / name / 'eval' / 'frontier.png') for name in RUNS)}")
    print(f"wall time: {time.time() - start:.0f} s", file=sys.stderr)
