"""`rlhf plot RUN_DIR`: PNG curves from the metrics.jsonl of every stage under a run dir (matplotlib)."""

from __future__ import annotations

from pathlib import Path

from rlhf.runtime.tracking import read_metrics, stage_metrics

# (stage dir, file name, title, [(metric, label)])
PANELS = [
    ("pretrain", "pretrain_loss.png", "Pretraining loss", [("train/loss", "train"), ("eval/loss", "held-out")]),
    ("sft", "sft_loss.png", "SFT loss (completion tokens)", [("train/loss", "train"), ("eval/loss", "held-out")]),
    (
        "rm",
        "rm_accuracy.png",
        "Reward model pairwise accuracy",
        [("train/accuracy", "train"), ("eval/accuracy", "held-out")],
    ),
    ("rm", "rm_loss.png", "Reward model ranking loss", [("train/loss", "train"), ("eval/loss", "held-out")]),
    (
        "ppo",
        "ppo_reward.png",
        "PPO reward",
        [
            ("objective/scores", "RM score"),
            ("objective/rlhf_reward", "score - beta*KL"),
            ("eval/rm_score", "held-out RM score"),
        ],
    ),
    (
        "ppo",
        "ppo_kl.png",
        "PPO KL to SFT (nats / sequence)",
        [("objective/kl", "k1"), ("objective/kl_k3", "k3"), ("objective/kl_smoothed", "smoothed (KL budget)")],
    ),
    ("ppo", "ppo_kl_coef.png", "PPO KL coefficient beta", [("objective/kl_coef", "beta")]),
    (
        "ppo",
        "ppo_hacking.png",
        "PPO signs of reward hacking",
        [
            ("rollout/distinct1", "distinct-1"),
            ("rollout/distinct2", "distinct-2"),
            ("rollout/eos_share", "EOS share"),
            ("objective/ensemble_std", "RM ensemble std"),
        ],
    ),
    ("ppo", "ppo_length.png", "PPO response length (tokens)", [("rollout/response_length", "mean length")]),
]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that logged `key` as a number."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write PNGs under `<run_dir>/plots/` for every stage with metrics; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out_dir = run_dir / "plots"
    written = []
    for stage, name, title, metrics in PANELS:
        rows = stage_metrics(run_dir, stage) or (
            read_metrics(run_dir / "metrics.jsonl") if run_dir.name == stage else []
        )
        lines = [(label, *series(rows, key)) for key, label in metrics]
        lines = [(label, x, y) for label, x, y in lines if x]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        for label, x, y in lines:
            ax.plot(x, y, marker="o" if len(x) < 15 else None, markersize=3, label=label)
        ax.set_title(f"{stage}: {title}")
        ax.set_xlabel("iteration" if stage == "ppo" else "step")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    return written
