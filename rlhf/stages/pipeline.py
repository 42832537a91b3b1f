"""`rlhf pipeline --config-dir DIR`: every stage of a recipe in order, each from the previous stage's `final/`.

Stages (each only if its YAML is in DIR): world.yaml (build the tiny world), pretrain.yaml (the SFT stage on
text), sft.yaml, rm.yaml, ppo.yaml, eval.yaml. A stage whose `final/` (eval: `eval.json`) exists is skipped; an
interrupted one resumes from its newest checkpoint (`resume: auto`). Wall times go to `<run>/pipeline.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from rlhf.config import ConfigError, check_paths, load_config
from rlhf.runtime.tracking import read_metrics, stage_metrics
from rlhf.stages.registry import run_stage

# (file stem of the stage's YAML, the stage it runs), in pipeline order
STAGES = [("pretrain", "sft"), ("sft", "sft"), ("rm", "rm"), ("ppo", "ppo"), ("eval", "eval")]


def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """`stage:key=value` -> {stage: [key=value]}."""
    out: dict[str, list[str]] = {}
    for text in overrides:
        stage, sep, rest = text.partition(":")
        if not sep or stage not in [s for s, _ in STAGES]:
            raise ConfigError(
                f"--set {text!r}: pipeline overrides look like STAGE:KEY=VALUE with STAGE one of "
                f"{[s for s, _ in STAGES]}"
            )
        out.setdefault(stage, []).append(rest)
    return out


def finished(stage_key: str, cfg) -> bool:
    """Whether a stage's output is complete: its `final/` dir, or eval's `eval.json`."""
    out = Path(cfg.output_dir)
    return (out / "eval.json").exists() if stage_key == "eval" else (out / "final").is_dir()


def run_pipeline(config_dir: str, overrides: list[str] | None = None, dry_run: bool = False) -> dict:
    """Run (or validate, with dry_run) every stage; returns {stage: seconds} for the stages that ran."""
    config_dir_path = Path(config_dir)
    if not config_dir_path.is_dir():
        raise ConfigError(f"--config-dir {config_dir} is not a directory")
    per_stage = split_overrides(overrides or [])
    present = [(s, k) for s, k in STAGES if (config_dir_path / f"{s}.yaml").exists()]
    if not present:
        raise ConfigError(f"{config_dir} holds none of {[s + '.yaml' for s, _ in STAGES]}")
    # validate every config up front (types, values), so a typo in eval.yaml fails before hours of PPO
    configs = {s: load_config(k, config_dir_path / f"{s}.yaml", per_stage.get(s)) for s, k in present}
    if dry_run:
        for s, _ in present:
            print(f"[pipeline] {config_dir_path / (s + '.yaml')}: config OK")
        return {}
    timings: dict[str, float] = {}
    world = config_dir_path / "world.yaml"
    if world.exists():
        spec = yaml.safe_load(world.read_text()) or {}
        if not (Path(spec["out"]) / "world.json").exists():
            from rlhf.tiny import build_tiny_world

            t0 = time.time()
            build_tiny_world(spec["out"], seed=int(spec.get("seed", 0)))
            timings["world"] = time.time() - t0
            _record(spec["out"], "world", timings["world"])
    for stage, key in present:
        cfg = configs[stage]
        if finished(key, cfg):
            print(f"[pipeline] {stage}: finished already ({cfg.output_dir}), skipped")
            continue
        check_paths(cfg, str(config_dir_path / f"{stage}.yaml"))
        print(f"[pipeline] {stage}: running ({cfg.output_dir})", flush=True)
        t0 = time.time()
        run_stage(key, str(config_dir_path / f"{stage}.yaml"), per_stage.get(stage, []))
        timings[stage] = time.time() - t0
        _record(cfg.output_dir, stage, timings[stage])
    return timings


def _record(output_dir: str, stage: str, seconds: float) -> None:
    """Add the stage's wall time to <run root>/pipeline.json (the parent of the stage's output dir)."""
    path = Path(output_dir).parent / "pipeline.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[stage] = round(seconds, 1)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _values(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if isinstance(r.get(key), (int, float))]


def _members_accuracy(run: Path) -> str:
    """For a reward-model ensemble: every member's last held-out accuracy (the line above shows member-0's)."""
    members = sorted((run / "rm").glob("member-*"), key=lambda p: int(p.name.split("-")[1]))
    last = [_values(read_metrics(m / "metrics.jsonl"), "eval/accuracy")[-1:] for m in members]
    if len(members) < 2 or not all(last):
        return ""
    return " (member-0; members: " + ", ".join(f"{v[0]:.3f}" for v in last) + ")"


def summarize(run_dir: str | Path) -> str:
    """A console table: per stage wall time and key metric, then the eval's scores."""
    run = Path(run_dir)
    times = json.loads((run / "pipeline.json").read_text()) if (run / "pipeline.json").exists() else {}
    lines = [f"{'stage':<10}{'wall time':>11}  key metric", "-" * 72]

    def first_last(stage: str, key: str, fmt: str = "{:.3f}") -> str:
        v = _values(stage_metrics(run, stage), key)
        return f"{fmt.format(v[0])} -> {fmt.format(v[-1])}" if v else "n/a"

    metrics = {
        "world": "tiny world built",
        "pretrain": f"held-out loss {first_last('pretrain', 'eval/loss')}",
        "sft": f"held-out loss {first_last('sft', 'eval/loss')}",
        "rm": f"held-out pairwise accuracy {first_last('rm', 'eval/accuracy')}{_members_accuracy(run)}",
        "ppo": f"RM score {first_last('ppo', 'objective/scores', '{:+.2f}')}, "
        f"KL {first_last('ppo', 'objective/kl', '{:.2f}')}",
    }
    ev = run / "eval" / "eval.json"
    if ev.exists():
        e = json.loads(ev.read_text())
        gold = (
            f"gold {e['gold_score_sft']:.3f} (SFT) -> {e['gold_score_policy']:.3f} (PPO), "
            if "gold_score_sft" in e
            else ""
        )
        metrics["eval"] = f"{gold}win-rate {e.get('win_rate', float('nan')):.2f}, KL to SFT {e['kl_to_sft']:.2f}"
        frontier = run / "eval" / "frontier.json"
        best = json.loads(frontier.read_text())["best"] if frontier.exists() else None
        if best:
            where = f"{best['name']} (KL {best['kl_to_sft']:.2f})"
            metrics["frontier"] = f"best checkpoint by the held-out proxy RM: {where}, plot in eval/frontier.png"
    for stage, text in metrics.items():
        if stage == "frontier":
            lines.append(f"{'frontier':<10}{'':>11}  {text}")
        elif stage in times or (run / stage).exists():
            t = f"{times[stage]:.0f} s" if stage in times else "(earlier)"
            lines.append(f"{stage:<10}{t:>11}  {text}")
    if times:
        lines.append("-" * 72)
        lines.append(f"{'total':<10}{sum(times.values()):>9.0f} s")
    return "\n".join(lines)
