"""`make bench`: throughput of each stage on the tiny world (CPU here; a GPU when present).

Prints one JSON line per stage: tokens/s, seconds per step / PPO iteration and its generate/score/train split,
and peak GPU memory when on CUDA. Runs into runs/bench/ (deleted first), needs the tiny world and SFT/RM
checkpoints from `make demo` (builds what is missing via the pipeline).
"""

import json
import shutil
import statistics
import sys
from pathlib import Path

import torch

from rlhf.config import load_config
from rlhf.stages import ppo, sft
from rlhf.stages.pipeline import run_pipeline

OUT = Path("runs/bench")
COMMON = ["logging.progress=off", "logging.tensorboard=false", "checkpoint.every=0", "resume=never"]


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def report(stage: str, metrics: list[dict], keys: list[str]) -> None:
    out = {
        "stage": stage,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
    }
    for key in keys:
        vals = [r[key] for r in metrics[1:] if isinstance(r.get(key), (int, float))]  # skip warm-up row
        if vals:
            out[key] = round(statistics.median(vals), 4)
    if torch.cuda.is_available():
        out["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(json.dumps(out), flush=True)


def main() -> None:
    if not Path("runs/tiny/rm/final").is_dir():
        run_pipeline("configs/tiny")
    shutil.rmtree(OUT, ignore_errors=True)
    cfg = load_config(
        "sft",
        "configs/tiny/sft.yaml",
        COMMON + [f"output_dir={OUT}/sft", "train.max_steps=40", "train.eval_every=0", "logging.every=5"],
    )
    sft.train(cfg)
    report("sft", rows(OUT / "sft" / "metrics.jsonl"), ["tokens_per_s"])
    cfg = load_config(
        "ppo",
        "configs/tiny/ppo.yaml",
        COMMON + [f"output_dir={OUT}/ppo", "train.max_steps=6", "data.eval_prompts.path="] + sys.argv[1:],
    )
    ppo.train(cfg)
    report(
        "ppo",
        rows(OUT / "ppo" / "metrics.jsonl"),
        ["tokens_per_s", "time/iteration", "time/generate", "time/score", "time/train"],
    )


if __name__ == "__main__":
    main()
