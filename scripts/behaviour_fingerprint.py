"""Fingerprint what the stages compute: short tiny-world runs through the `rlhf` command, then every logged metric
(timings and throughput left out) and a SHA-256 of every weight file each run wrote.

A refactor that claims "behaviour unchanged" runs this before and after and compares the two JSON files:

    python scripts/behaviour_fingerprint.py --out /tmp/before.json      # on the old commit
    python scripts/behaviour_fingerprint.py --out /tmp/after.json       # on the new one
    python scripts/behaviour_fingerprint.py --compare /tmp/before.json /tmp/after.json

Only the public interface is used (`python -m rlhf <stage> --config ... --set ...`), so the script runs unchanged
on both sides of a change to the package's layout. fp32, one process, no progress bar: bit-exact on one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"
# keys that measure the host, not the computation
VOLATILE = ("time", "per_s", "seconds", "/s", "memory", "mib", "elapsed", "eta")
QUIET = [
    "logging.progress=off",
    "logging.tensorboard=false",
    "train.mixed_precision=no",
    "resume=never",
    "checkpoint.every=0",
]


def volatile(key: str) -> bool:
    return any(t in key.lower() for t in VOLATILE)


def rlhf(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, "-m", "rlhf", *args], check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)


def stage(name: str, yaml_name: str, sets: list[str]) -> None:
    argv = [name, "--config", str(TINY / yaml_name)]
    for s in QUIET + sets:
        argv += ["--set", s]
    rlhf(*argv)


def runs(root: Path) -> dict[str, Path]:
    """Run every fingerprinted configuration under root; returns run name -> output dir."""
    world, data = root / "world", root / "world" / "data"
    rlhf("tiny", "--out", str(world), "--seed", "0")
    out = {name: root / name for name in ("pretrain", "sft", "rm", "dpo", "ppo_gae_ptx", "ppo_rloo", "ppo_grpo")}
    stage(
        "sft",
        "pretrain.yaml",
        [
            f"output_dir={out['pretrain']}",
            f"model.name_or_path={world / 'model_config'}",
            f"model.tokenizer={world / 'tokenizer'}",
            f"data.train.path={data / 'pretrain.jsonl'}",
            f"data.eval.path={data / 'pretrain_eval.jsonl'}",
            "train.max_steps=30",
            "train.batch_size=32",
            "train.micro_batch_size=16",
            "train.eval_every=15",
            "logging.every=5",
        ],
    )
    stage(
        "sft",
        "sft.yaml",
        [
            f"output_dir={out['sft']}",
            f"model.name_or_path={out['pretrain'] / 'final'}",
            f"data.train.path={data / 'sft.jsonl'}",
            f"data.eval.path={data / 'sft_eval.jsonl'}",
            f"data.pretrain_mix.path={data / 'pretrain.jsonl'}",
            "train.max_steps=20",
            "train.batch_size=16",
            "train.micro_batch_size=8",
            "train.eval_every=10",
            "logging.every=5",
            "logging.num_samples=0",
        ],
    )
    sft_final = out["sft"] / "final"
    stage(
        "rm",
        "rm.yaml",
        [
            f"output_dir={out['rm']}",
            f"model.name_or_path={sft_final}",
            f"data.train.path={data / 'comparisons.jsonl'}",
            f"data.eval.path={data / 'comparisons_eval.jsonl'}",
            f"data.reference.path={data / 'sft.jsonl'}",
            "data.reference_max_rows=64",
            "train.max_steps=12",
            "train.batch_size=8",
            "train.micro_batch_size=4",
            "train.eval_every=6",
            "logging.every=3",
        ],
    )
    stage(
        "dpo",
        "dpo.yaml",
        [
            f"output_dir={out['dpo']}",
            f"model.name_or_path={sft_final}",
            f"data.train.path={data / 'comparisons.jsonl'}",
            f"data.eval.path={data / 'comparisons_eval.jsonl'}",
            "train.max_steps=10",
            "train.batch_size=8",
            "train.micro_batch_size=4",
            "train.eval_every=5",
            "logging.every=2",
        ],
    )
    ppo_common = [
        f"models.policy.name_or_path={sft_final}",
        f"models.reward.name_or_path={out['rm'] / 'final'}",
        f"data.prompts.path={data / 'prompts.jsonl'}",
        f"data.eval_prompts.path={data / 'eval_prompts.jsonl'}",
        f"ptx.data.path={data / 'pretrain.jsonl'}",
        "train.max_steps=4",
        "train.batch_size=16",
        "ppo.mini_batch_size=8",
        "ppo.micro_batch_size=4",
        "ppo.ppo_epochs=2",
        "rollout.max_new_tokens=12",
        "logging.every=1",
        "logging.num_samples=0",
        "train.eval_every=2",
    ]
    stage("ppo", "ppo.yaml", ppo_common + [f"output_dir={out['ppo_gae_ptx']}", "kl.adaptive=true", "kl.target=1.0"])
    group = ["rollout.samples_per_prompt=4", "ptx.ptx_coef=0.0"]
    stage("ppo", "ppo.yaml", ppo_common + group + [f"output_dir={out['ppo_rloo']}", "ppo.advantage=rloo"])
    stage("ppo", "ppo.yaml", ppo_common + group + [f"output_dir={out['ppo_grpo']}", "ppo.advantage=grpo"])
    return out


def fingerprint(run_dir: Path) -> dict:
    metrics = []  # an ensemble's members log under their own dirs
    for path in sorted(run_dir.rglob("metrics.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                kept = {k: v for k, v in row.items() if not volatile(k)}
                metrics.append({"file": str(path.relative_to(run_dir))} | kept)
    weights = {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*.safetensors"))
    }
    return {"metrics": metrics, "weights": weights}


def compare(before: dict, after: dict) -> int:
    bad = 0
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None or b is None:
            print(f"{name}: only on one side")
            bad += 1
            continue
        same_w = a["weights"] == b["weights"]
        same_m = a["metrics"] == b["metrics"]
        print(
            f"{name}: {len(a['weights'])} weight files {'identical' if same_w else 'DIFFER'}, "
            f"{len(a['metrics'])} metric rows {'identical' if same_m else 'DIFFER'}"
        )
        if not same_m:
            for i, (ra, rb) in enumerate(zip(a["metrics"], b["metrics"])):
                if ra != rb:
                    keys = sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k))
                    print(f"  row {i}: {keys[:8]}")
                    break
        bad += (not same_w) + (not same_m)
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the fingerprint JSON here")
    parser.add_argument("--keep", help="run under this dir (kept) instead of a temporary one")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        for side in (before, after):  # files written before a key joined VOLATILE
            for run in side.values():
                run["metrics"] = [{k: v for k, v in r.items() if not volatile(k)} for r in run["metrics"]]
        return compare(before, after)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        result = {name: fingerprint(d) for name, d in runs(root).items()}
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {args.out}: {', '.join(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
