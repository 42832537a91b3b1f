"""`rlhf report RUN_ROOT`: one self-contained HTML page for a pipeline's run root (runs/tiny: pretrain/ sft/ rm/
dpo/ ppo/ eval/), or for one stage's output dir.

The page holds the summary table `rlhf pipeline` prints, each stage's curves (rlhf.tools.plot's panels, drawn
inline as base64 PNG, every reward-model ensemble member beside each other), PPO's KL and beta trajectory and its
collapse signs, `rlhf eval`'s frontier and figures, SFT's and the policy's samples for the same prompts side by
side, and each stage's resolved config. Nothing is fetched: no external URL, no script. Missing stages and files
are left out.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from rlhf.runtime.model_card import library_versions
from rlhf.runtime.tracking import read_metrics, stage_metrics
from rlhf.tools.plot import PANELS, series

STAGE_ORDER = ("world", "pretrain", "sft", "rm", "dpo", "ppo", "eval")
MORE_PANELS = [
    ("dpo", "DPO loss", [("train/loss", "train"), ("eval/loss", "held-out")]),
    ("dpo", "DPO preference accuracy", [("train/accuracy", "train"), ("eval/accuracy", "held-out")]),
    ("dpo", "DPO implicit reward margin", [("train/reward_margin", "train"), ("eval/reward_margin", "held-out")]),
    ("ppo", "PPO collapse flags (signs over their limits)", [("rollout/collapse_flags", "flags")]),
    ("ppo", "PPO repeated n-grams", [("rollout/repeat_share", "repeat share")]),
]
STAGE_FILES = ("metrics.jsonl", "config.yaml", "final", "member-0", "eval.json")  # what makes a dir a stage's
IN_WIDE_CHART = [("objective/kl_coef", "beta")]  # plot.PANELS' beta panel: drawn in the KL-and-beta chart instead
SAMPLE_PROMPTS = 12
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
.grid { display: grid; grid-template-columns: repeat(3, 1fr); gap: 8px; }
img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: .9em; margin: .5em 0; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } tr.best td { background: #e8f6e8; } tr.flagged td { background: #fbe9e9; }
pre { background: #f8f8f8; padding: .6em; overflow-x: auto; font-size: .85em; }
.note { color: #666; font-size: .9em; }
"""


def esc(value) -> str:
    return html.escape(str(value))


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "; ".join(map(str, value))
    return "" if value is None else str(value)


def html_table(rows: list[list], header: list[str], row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def png_tag(data: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


class Figures:
    """Matplotlib figures drawn to inline PNG; none at all (a note instead) when matplotlib is not installed."""

    def __init__(self):
        try:
            import matplotlib
        except ImportError:
            self.plt = None
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt

    def png(self, fig, alt: str) -> str:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        self.plt.close(fig)
        return png_tag(buf.getvalue(), alt)

    def lines(self, title: str, lines: list[tuple[str, list, list]], xlabel: str) -> str:
        """One panel of (label, steps, values) lines, as plot.plot_run draws them."""
        fig, ax = self.plt.subplots(figsize=(6, 3.4), dpi=100)
        for label, x, y in lines:
            ax.plot(x, y, marker="o" if len(x) < 15 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return self.png(fig, title)

    def kl_and_beta(self, rows: list[dict]) -> str | None:
        """KL per sequence (k1, smoothed) and beta on a second axis, over PPO iterations."""
        kl = [
            (label, *series(rows, key))
            for key, label in (("objective/kl", "KL"), ("objective/kl_smoothed", "smoothed"))
        ]
        kl = [line for line in kl if line[1]]
        steps, beta = series(rows, "objective/kl_coef")
        if not kl and not steps:
            return None
        fig, ax = self.plt.subplots(figsize=(12, 3.6), dpi=100)
        for label, x, y in kl:
            ax.plot(x, y, label=label)
        ax.set_ylabel("KL to SFT (nats / sequence)")
        ax.set_xlabel("PPO iteration")
        if steps:
            beta_ax = ax.twinx()
            beta_ax.plot(steps, beta, color="black", linestyle="--", label="beta (kl_coef)")
            beta_ax.set_ylabel("beta")
            beta_ax.set_ylim(0, max(beta) * 1.25)  # from 0: a fixed beta is a flat line, not a zoomed-in wiggle
            beta_ax.legend(loc="upper right", fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_title("PPO: KL to the reference and the KL coefficient beta")
        return self.png(fig, "KL and beta")


def discover_stages(run_root: Path) -> list[str]:
    """Stage dirs under the run root, pipeline order first; the root itself when it is one stage's dir."""
    if (run_root / "metrics.jsonl").is_file() or (run_root / "config.yaml").is_file():
        return ["."]
    present = [p.name for p in sorted(run_root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    known = [s for s in STAGE_ORDER if s in present]
    others = [s for s in present if s not in known and any((run_root / s / f).exists() for f in STAGE_FILES)]
    return known + others


def stage_kind(run_root: Path, stage: str) -> str:
    """Which stage a dir holds (its name when it is one of the pipeline's, else guessed from its config)."""
    if stage in STAGE_ORDER:
        return stage
    from rlhf.runtime.model_card import read_yaml, stage_of

    config = read_yaml(run_root / stage / "config.yaml") or {}
    return stage_of(config) or ("eval" if "judge" in config else stage)


def curves_section(run_root: Path, stage: str, kind: str, figures: Figures) -> str:
    """The stage's panels (plot.PANELS and MORE_PANELS of its kind) that have data; PPO's KL and beta first."""
    rows = stage_metrics(run_root, stage)
    panels = [(title, metrics) for s, _, title, metrics in PANELS if s == kind and metrics != IN_WIDE_CHART]
    panels += [(title, metrics) for s, title, metrics in MORE_PANELS if s == kind]
    images = []
    for title, metrics in panels:
        lines = [(label, *series(rows, key)) for key, label in metrics]
        lines = [line for line in lines if line[1]]
        if lines:
            images.append(figures.lines(f"{kind}: {title}", lines, "iteration" if kind == "ppo" else "step"))
    wide = (figures.kl_and_beta(rows) or "") if kind == "ppo" else ""
    if kind == "rm":
        members, wide = ensemble_panels(run_root / stage, figures)
        images = members or images  # an ensemble's members replace member-0's curves
    return f"{wide}<div class='grid'>{''.join(images)}</div>" if images or wide else ""


def ensemble_panels(rm_dir: Path, figures: Figures) -> tuple[list[str], str]:
    """Every ensemble member's held-out accuracy and training loss, one line each (the held-out ones marked), and
    a caption naming them; nothing for a single reward model."""
    members = sorted(rm_dir.glob("member-*"), key=lambda p: int(p.name[7:]) if p.name[7:].isdigit() else 0)
    if len(members) < 2:
        return [], ""
    holdout = set()
    manifest = rm_dir / "final" / "ensemble.json"
    if manifest.is_file():
        holdout = {Path(p).parent.name for p in json.loads(manifest.read_text()).get("holdout", [])}
    out = []
    for key, title in (("eval/accuracy", "held-out pairwise accuracy"), ("train/loss", "ranking loss (train)")):
        lines = []
        for m in members:
            x, y = series(read_metrics(m / "metrics.jsonl"), key)
            if x:
                lines.append((m.name + (" (held out: the proxy)" if m.name in holdout else ""), x, y))
        if lines:
            out.append(figures.lines(f"rm ensemble: {title}", lines, "step"))
    held = f"; held out of PPO's reward (the proxy `rlhf eval` selects by): {', '.join(sorted(holdout))}"
    return out, f"<p>An ensemble of {len(members)} reward models{held if holdout else ''}.</p>"


def collapse_summary(rows: list[dict]) -> str:
    steps, flags = series(rows, "rollout/collapse_flags")
    if not steps:
        return "<p class='note'>No collapse signs logged (rollout/collapse_flags).</p>"
    flagged = [s for s, f in zip(steps, flags) if f]
    if not flagged:
        return f"<p>No collapse flag in {len(steps)} iterations.</p>"
    return (
        f"<p><b>Collapse flags in {len(flagged)} of {len(steps)} iterations</b> (first at iteration {flagged[0]}): "
        "repeated n-grams, distinct-2, length or EOS share past their limits (ppo.collapse).</p>"
    )


def frontier_section(eval_dir: Path) -> str:
    """`rlhf eval`'s frontier: its plot (eval wrote frontier.png) and one table row per checkpoint."""
    path = eval_dir / "frontier.json"
    if not path.is_file():
        return ""
    report = json.loads(path.read_text())
    keys = ["name", "step", "kl_to_sft", "rm_score", "proxy_score", "gold_score", "win_rate", "distinct2"]
    rows = [report.get("sft", {})] + report.get("rows", [])
    keys = [k for k in keys if any(k in r for r in rows)] + ["collapse"]
    best = (report.get("best") or {}).get("name")
    classes = ["best" if r.get("name") == best else "flagged" if r.get("collapse") else "" for r in rows]
    parts = ["<h2>Frontier: score against KL over the PPO checkpoints</h2>"]
    if (eval_dir / "frontier.png").is_file():
        parts.append(png_tag((eval_dir / "frontier.png").read_bytes(), "frontier"))
    chosen = f"best by {report.get('selected_by')}: <b>{esc(best)}</b>" if best else "no checkpoint selected"
    parts.append(f"<p>{chosen}; green = selected, red = collapse flag.</p>")
    parts.append(html_table([[r.get(k) for k in keys] for r in rows], keys, classes))
    return "".join(parts)


def eval_section(eval_dir: Path) -> str:
    path = eval_dir / "eval.json"
    if not path.is_file():
        return ""
    result = json.loads(path.read_text())
    paired = sorted({k[: -len("_sft")] for k in result if k.endswith("_sft") and k[:-4] + "_policy" in result})
    rows = [[k, result[f"{k}_sft"], result[f"{k}_policy"]] for k in paired]
    used = {f"{k}_{m}" for k in paired for m in ("sft", "policy")}
    rest = [[k, v] for k, v in sorted(result.items()) if k not in used]
    return (
        "<h2>Evaluation: the policy against SFT (eval.json)</h2><div class='grid'>"
        + html_table(rows, ["metric", "SFT", "policy"])
        + html_table(rest, ["figure", "value"])
        + "</div>"
    )


def samples_section(eval_dir: Path) -> str:
    """The first sample of each of the first prompts of `rlhf eval`'s samples.jsonl: SFT and policy side by side."""
    path = eval_dir / "samples.jsonl"
    if not path.is_file():
        return ""
    seen, rows = set(), []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("prompt") in seen:
            continue
        seen.add(row.get("prompt"))
        rows.append(row)
        if len(rows) == SAMPLE_PROMPTS:
            break
    cells = [[r.get("prompt"), cell(r, "sft"), cell(r, "policy")] for r in rows]
    note = f"<p class='note'>The first sample for each of the first {len(rows)} held-out prompts.</p>"
    return (
        "<h2>Samples: SFT and the policy on the same prompts</h2>"
        + note
        + html_table(cells, ["prompt", "SFT", "policy"])
    )


def cell(row: dict, model: str) -> str:
    scores = ", ".join(f"{k[: -len(model) - 1]} {fmt(v)}" for k, v in row.items() if k.endswith(f"_{model}"))
    return f"{row.get(model, '')}" + (f"  [{scores}]" if scores else "")


def config_section(run_root: Path, stages: list[str]) -> str:
    parts = ["<h2>Resolved configs</h2>"]
    for stage in stages:
        path = run_root / stage / "config.yaml"
        path = path if path.is_file() else run_root / stage / "member-0" / "config.yaml"  # an RM ensemble's
        if path.is_file():
            parts.append(
                f"<details><summary>{esc(stage)}: {esc(path)}</summary><pre>{esc(path.read_text())}</pre></details>"
            )
    return "".join(parts) if len(parts) > 1 else ""


def summary_section(run_root: Path) -> str:
    from rlhf.stages.pipeline import summarize

    return f"<h2>Summary</h2><pre>{esc(summarize(run_root))}</pre>"


def build_report(run_root: str | Path) -> str:
    """The HTML page for a run root (see the module docstring)."""
    run_root = Path(run_root)
    if not run_root.is_dir():
        from rlhf.config import ConfigError

        raise ConfigError(f"{run_root} is not a directory")
    figures = Figures()
    stages = discover_stages(run_root)
    body = [f"<h1>rlhf run report: {esc(run_root)}</h1>", summary_section(run_root)]
    if figures.plt is None:
        body.append("<p class='note'>matplotlib is not installed (pip install 'rlhf[plot]'): no curves.</p>")
    kinds = {stage: stage_kind(run_root, stage) for stage in stages}
    for stage in [s for s in stages if kinds[s] == "eval"]:  # the outcome first, then how the run got there
        body += [frontier_section(run_root / stage), eval_section(run_root / stage), samples_section(run_root / stage)]
    for stage in [s for s in stages if kinds[s] != "eval"]:
        kind = kinds[stage]
        name = run_root.name if stage == "." else stage
        curves = curves_section(run_root, stage, kind, figures) if figures.plt else ""
        if kind == "ppo":
            curves += collapse_summary(stage_metrics(run_root, stage))
        if curves:
            body.append(f"<h2>{esc(name)}</h2>{curves}")
    body.append(config_section(run_root, stages))
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items() if v != "not installed")
    body.append(f"<p class='note'>Written by `rlhf report` ({esc(versions)}).</p>")
    title = f"rlhf report: {esc(run_root)}"
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def write_report(run_root: str | Path, out: str | Path | None = None) -> Path:
    """Write the page to `out` (default `<run_root>/report.html`) and return its path."""
    path = Path(out) if out else Path(run_root) / "report.html"
    page = build_report(run_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
