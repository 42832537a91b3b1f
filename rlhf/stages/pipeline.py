"""`rlhf pipeline --config-dir DIR`: every stage of a recipe in order, each from the previous stage's `final/`,
re-running exactly what changed.

Stages (each only if its YAML is in DIR): world.yaml (build the tiny world), pretrain.yaml (the SFT stage on
text), sft.yaml, rm.yaml, ppo.yaml, eval.yaml. Before each stage the pipeline compares the stage's resolved config
and its inputs' fingerprints with the `provenance.json` its output recorded (`rlhf.runtime.provenance`):

- finished and unchanged: skipped;
- finished but a result-changing key or an input changed (or a stage before it re-ran): the old output is moved
  aside to `<output_dir>.old-<n>` (never deleted) and the stage runs, then every stage after it;
- interrupted (checkpoints, no `final/`) and unchanged: resumed from its newest checkpoint; changed: moved aside.

`--from STAGE` re-runs that stage and every later one, `--only STAGE...` only those, `--force` all; `--dry-run`
prints the plan (skip / run / resume, and why) and runs nothing. Wall times go to `<run root>/pipeline.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import (
    ConfigError,
    check_paths,
    expand_run_root,
    load_config,
    read_yaml,
    recipe_run_root,
    split_run_root,
)
from rlhf.runtime import provenance
from rlhf.runtime.tracking import read_metrics, stage_metrics
from rlhf.stages.registry import run_stage
from rlhf.tiny import build_tiny_world

# (file stem of the stage's YAML, the stage it runs), in pipeline order
STAGES = [("pretrain", "sft"), ("sft", "sft"), ("rm", "rm"), ("ppo", "ppo"), ("eval", "eval")]
STEMS = [s for s, _ in STAGES]


@dataclass
class Step:
    """One stage of the plan: what to do with it (skip, run, resume) and why."""

    name: str  # the YAML's stem: pretrain, sft, rm, ppo, eval
    stage: str  # the stage it runs
    config: Path
    cfg: Any
    action: str = "skip"
    reasons: tuple[str, ...] = ()

    def line(self) -> str:
        return f"[pipeline] {self.name}: {self.action} ({self.cfg.output_dir}): {'; '.join(self.reasons)}"


def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """`stage:key=value` -> {stage: [key=value]}; `run_root=DIR` goes to every stage."""
    run_root, overrides = split_run_root(overrides)
    out: dict[str, list[str]] = {s: [f"run_root={run_root}"] for s in STEMS} if run_root is not None else {}
    for text in overrides:
        stage, sep, rest = text.partition(":")
        if not sep or stage not in STEMS:
            raise ConfigError(
                f"--set {text!r}: pipeline overrides look like STAGE:KEY=VALUE with STAGE one of {STEMS}"
            )
        out.setdefault(stage, []).append(rest)
    return out


def finished(stage: str, cfg) -> bool:
    """Whether a stage's output is complete: its `final/` dir, or eval's `eval.json`."""
    out = Path(cfg.output_dir)
    return (out / "eval.json").exists() if stage == "eval" else (out / "final").is_dir()


def _interrupted(cfg) -> bool:
    out = Path(cfg.output_dir)
    return any(out.glob("checkpoint-*")) or any(out.glob("member-*/checkpoint-*"))


def decide(step: Step, forced: str | None, reran: list[str]) -> Step:
    """Fill step.action and step.reasons from the user's flags (`forced`), the stages re-run before it, and the
    stage's output and its recorded provenance."""
    cfg = step.cfg
    if forced:
        step.action, step.reasons = ("skip", ("not named by --only",)) if forced == "-" else ("run", (forced,))
        return step
    if reran:
        step.action, step.reasons = "run", (f"{reran[-1]} before it re-runs",)
        return step
    recorded = provenance.read(cfg.output_dir)
    stale = provenance.stale_reasons(recorded, provenance.record(step.stage, cfg)) if recorded else []
    if finished(step.stage, cfg):
        if recorded is None:
            step.action, step.reasons = "skip", ("finished already, no provenance.json to compare (--force re-runs)",)
        elif stale:
            step.action, step.reasons = "run", tuple(stale)
        else:
            step.action, step.reasons = "skip", ("finished already, config and inputs unchanged",)
    elif _interrupted(cfg) and not stale:
        step.action, step.reasons = "resume", ("interrupted: resumes from its newest checkpoint",)
    else:
        step.action, step.reasons = "run", tuple(stale) or ("no finished output",)
    return step


def forced_reason(name: str, start: str | None, only: list[str], force: bool) -> str | None:
    """Why the user's flags force stage `name` to run ("-": to be left alone; None: the pipeline decides)."""
    if force:
        return "--force"
    if only:
        return "--only" if name in only else "-"
    if start and STEMS.index(name) >= STEMS.index(start):
        return f"--from {start}"
    return None


def move_aside(output_dir: str) -> Path | None:
    """Rename a previous output to `<output_dir>.old-<n>` (the first free n); None when there is none."""
    out = Path(output_dir)
    if not out.exists():
        return None
    n = 1
    while out.with_name(f"{out.name}.old-{n}").exists():
        n += 1
    return out.rename(out.with_name(f"{out.name}.old-{n}"))


def run_pipeline(
    config_dir: str,
    overrides: list[str] | None = None,
    dry_run: bool = False,
    start: str | None = None,
    only: list[str] | None = None,
    force: bool = False,
) -> dict:
    """Run (or, with dry_run, plan) the recipe in `config_dir`; returns {stage: seconds} for the stages that ran."""
    root = Path(config_dir)
    if not root.is_dir():
        raise ConfigError(f"--config-dir {config_dir} is not a directory")
    per_stage = split_overrides(overrides or [])
    present = [(s, k) for s, k in STAGES if (root / f"{s}.yaml").exists()]
    if not present:
        raise ConfigError(f"{config_dir} holds none of {[s + '.yaml' for s in STEMS]}")
    for name in ([start] if start else []) + list(only or []):
        if name not in [s for s, _ in present]:
            raise ConfigError(f"--from/--only {name!r}: not a stage of {config_dir} ({[s for s, _ in present]})")
    # every config validated up front (types, values), so a typo in eval.yaml fails before hours of PPO
    steps = [Step(s, k, root / f"{s}.yaml", load_config(k, root / f"{s}.yaml", per_stage.get(s))) for s, k in present]
    timings: dict[str, float] = {}
    world = _world(root, overrides or [], dry_run, timings)
    reran = [world] if world else []
    for step in steps:
        decide(step, forced_reason(step.name, start, only or [], force), [] if only else reran)
        print(step.line(), flush=True)
        if dry_run or step.action == "skip":
            if step.action != "skip":
                reran.append(step.name)  # what a real run would do after it
            continue
        if step.action == "run":
            check_paths(step.cfg, str(step.config))  # before the old output is moved: a bad path loses nothing
            aside = move_aside(step.cfg.output_dir)
            if aside is not None:
                print(f"[pipeline] {step.name}: the previous output is kept in {aside}", flush=True)
        t0 = time.time()
        run_stage(step.stage, str(step.config), per_stage.get(step.name, []))
        timings[step.name] = time.time() - t0
        _record(step.cfg.output_dir, step.name, timings[step.name])
        reran.append(step.name)
    return timings


def _world(root: Path, overrides: list[str], dry_run: bool, timings: dict) -> str | None:
    """Build (or re-build, for another seed) the tiny world that world.yaml names; returns "world" if it was."""
    path = root / "world.yaml"
    if not path.exists():
        return None
    spec = read_yaml(str(path))
    run_root = split_run_root(overrides)[0] or recipe_run_root(root)
    spec = expand_run_root(spec, run_root, str(path))
    out, seed = Path(spec["out"]), int(spec.get("seed", 0))
    made = json.loads((out / "world.json").read_text()) if (out / "world.json").exists() else None
    if made is not None and made.get("seed") == seed:
        return None
    why = "not built yet" if made is None else f"seed {made.get('seed')} -> {seed}"
    print(f"[pipeline] world: run ({out}): {why}", flush=True)
    if dry_run:
        return "world"
    aside = move_aside(str(out)) if made is not None else None
    if aside is not None:
        print(f"[pipeline] world: the previous world is kept in {aside}", flush=True)
    t0 = time.time()
    build_tiny_world(out, seed=seed)
    timings["world"] = time.time() - t0
    _record(str(out), "world", timings["world"])
    return "world"


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
