"""The `rlhf` command: one subcommand per stage plus the tools around them (see `rlhf --help`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf.config import ConfigError, load_config
from rlhf.data.sources import DataError
from rlhf.runtime.checkpoints import CheckpointError
from rlhf.runtime.guards import EXIT_STOPPED, NonFiniteError, StoppedBySignal
from rlhf.runtime.model_card import package_version
from rlhf.runtime.tracking import quiet_hf_progress
from rlhf.stages.registry import run_stage
from rlhf.tools.push import PushError

FRONT_DOOR = ("chat", "report", "push", "env", "recipes", "init")
STAGE_HELP = {
    "sft": "stage 1: supervised fine-tuning (or pretraining with data.kind: text)",
    "rm": "stage 2: reward model from K-way rankings",
    "dpo": "instead of rm + ppo: Direct Preference Optimization of the SFT model on the same rankings",
    "ppo": "stage 3: PPO(-ptx) against the reward model with a KL penalty to SFT",
    "eval": "sample SFT and policy on held-out prompts: gold/RM scores, win-rate, KL, collapse signs",
}


def _stage_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help=STAGE_HELP[name], description=STAGE_HELP[name])
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=1e-4 (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="validate the config (types, values, local paths) and exit")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (file + --set overrides + every default) as YAML and exit",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="InstructGPT-style RLHF: SFT -> RM -> PPO-ptx.")
    parser.add_argument("--version", action="version", version=f"rlhf {package_version('rlhf')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGE_HELP:
        _stage_parser(sub, name)
    p = sub.add_parser("pipeline", help="run every stage of a recipe dir in order, re-running what changed")
    p.add_argument("--config-dir", required=True, help="dir with pretrain/sft/rm/ppo/eval YAMLs")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STAGE:KEY=VALUE",
        help="override a key of one stage, e.g. --set ppo:train.max_steps=10",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate every config and print the plan (skip / run and why)"
    )
    p.add_argument("--from", dest="start", metavar="STAGE", help="re-run this stage and every one after it")
    p.add_argument("--only", nargs="+", default=[], metavar="STAGE", help="run only these stages")
    p.add_argument("--force", action="store_true", help="re-run every stage (old outputs are moved aside)")
    p = sub.add_parser("generate", help="sample from a checkpoint")
    p.add_argument("--model", required=True, help="a model dir (e.g. runs/tiny/ppo/final)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    group.add_argument("--prompts-file", help="a prompts file (jsonl/json/parquet with a prompt field)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-template", default=None, help="plain prompt format (default: the model's run's)")
    p = sub.add_parser("tiny", help="build the tiny world (data, tokenizer, model config)")
    p.add_argument("--out", default="runs/tiny/world")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("plot", help="PNG curves from a run dir's metrics.jsonl files")
    p.add_argument("run_dir")
    p = sub.add_parser("plan", help="estimate memory per device and time of a stage before renting a GPU")
    p.add_argument("--config", required=True, help="an sft/rm/dpo/ppo YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="as for a stage")
    p.add_argument("--stage", choices=["sft", "rm", "dpo", "ppo"], help="default: from the file name or its keys")
    p.add_argument("--device-memory", help="memory of one device, e.g. 80GiB: warn when the estimate exceeds it")
    p.add_argument("--num-processes", type=int, default=1, help="processes (GPUs) the run is launched with")
    p.add_argument("--topology", choices=["ddp", "fsdp", "zero2", "zero3"], default="ddp")
    p.add_argument("--tflops", type=float, help="achieved TFLOP/s per device, for a time estimate")
    p.add_argument("--strict", action="store_true", help="exit 1 when the estimate exceeds --device-memory")
    _front_door_parsers(sub)
    return parser


def _front_door_parsers(sub) -> None:
    """The commands around a finished run: talk to it, report it, publish it; and where a new one starts."""
    p = sub.add_parser("chat", help="talk to a model, turn by turn, in the prompt format it was trained with")
    p.add_argument("model", metavar="MODEL", help="a model dir (e.g. runs/tiny/ppo/final) or hub name")
    p.add_argument("--system", default="", help="a system message leading the conversation")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-template", default=None, help="plain prompt format (default: the model's run's)")
    p = sub.add_parser("report", help="one self-contained HTML page for a run root: curves, frontier, samples")
    p.add_argument("run_root", metavar="RUN_ROOT", help="a pipeline's run root (runs/tiny) or one stage's dir")
    p.add_argument("--out", help="the HTML file (default: RUN_ROOT/report.html)")
    p = sub.add_parser(
        "push",
        help="upload a final/ to the Hugging Face Hub",
        description="Upload a stage's final/ (weights, tokenizer, model card) to a Hugging Face Hub model repo with "
        "huggingface_hub (authenticated by HF_TOKEN or `hf auth login`). Tested against a stand-in of the hub API "
        "only: the project's tests never reach the hub.",
    )
    p.add_argument("path", metavar="RUN_OR_FINAL", help="a stage's output dir (its final/ is pushed) or a model dir")
    p.add_argument("repo", metavar="REPO", help="the hub repo id, e.g. you/tiny-ppo")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="a branch to push to (created if needed; default: main)")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; send and write nothing")
    p = sub.add_parser("env", help="versions, devices, bf16, processes: what a run here would do (for bug reports)")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    sub.add_parser("recipes", help="list the recipes shipped with the package")
    p = sub.add_parser("init", help="copy a shipped recipe's YAMLs into a dir to make it yours")
    p.add_argument("recipe", metavar="RECIPE", help="a name `rlhf recipes` lists")
    p.add_argument("dir", metavar="DIR", help="where the YAMLs go; DIR/recipe.yaml gets run_root: DIR/runs (absolute)")
    p.add_argument("--force", action="store_true", help="overwrite files already in DIR")


def run_front_door(args) -> int:
    if args.command == "chat":
        from rlhf.tools.chat import main as chat_main

        return chat_main(args)
    if args.command == "report":
        from rlhf.tools.report import write_report

        print(write_report(args.run_root, args.out))
    elif args.command == "push":
        from rlhf.tools.push import push

        _, files = push(args.path, args.repo, args.private, args.revision, args.dry_run)
        if args.dry_run:
            print("\n".join(f"  {f}" for f in files))
    elif args.command == "env":
        import json

        from rlhf.tools.env import environment, format_environment

        plan = build_parser().parse_args(["plan", "--config", "-"])
        env = environment({"topology": plan.topology, "num_processes": plan.num_processes})
        print(json.dumps(env, indent=2) if args.json else format_environment(env))
    elif args.command == "recipes":
        from rlhf.tools.recipes import format_recipes, list_recipes

        print(format_recipes(list_recipes()))
    elif args.command == "init":
        from rlhf.tools.recipes import init_recipe

        written = init_recipe(args.recipe, args.dir, args.force)
        print(f"recipe {args.recipe} copied to {args.dir}: {', '.join(p.name for p in written)}")
        print(f"validate it with: rlhf pipeline --config-dir {args.dir} --dry-run")
    return 0


def run_plan(args) -> int:
    import yaml

    from rlhf.tools.plan import format_plan, guess_stage, parse_bytes, plan_config

    if args.num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {args.num_processes}")
    device_memory = parse_bytes(args.device_memory) if args.device_memory else None
    stage = args.stage
    if stage is None:
        try:
            data = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) if Path(args.config).is_file() else {}
        except (yaml.YAMLError, UnicodeDecodeError):
            data = {}
        stage = guess_stage(args.config, data if isinstance(data, dict) else {})
    cfg = load_config(stage, args.config, args.overrides)
    plan = plan_config(stage, cfg, args.num_processes, args.topology)
    print(format_plan(plan, device_memory, args.tflops))
    return 1 if args.strict and device_memory is not None and plan.total > device_memory else 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    finally:
        _release_process_group()


def _release_process_group() -> None:
    """Destroy the process group of a multi-process run once the command is done (every stage shares it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    quiet_hf_progress()
    try:
        if args.command in STAGE_HELP:
            run_stage(args.command, args.config, args.overrides, args.dry_run, args.print_config)
        elif args.command == "pipeline":
            from rlhf.stages.pipeline import run_pipeline

            run_pipeline(args.config_dir, args.overrides, args.dry_run, args.start, args.only, args.force)
        elif args.command == "generate":
            from rlhf.tools.generate import main as generate_main

            generate_main(args)
        elif args.command == "tiny":
            from rlhf.tiny import build_tiny_world

            paths = build_tiny_world(args.out, seed=args.seed)
            print(f"tiny world (seed {args.seed}) written to {args.out}: {', '.join(sorted(paths))}")
        elif args.command == "plan":
            return run_plan(args)
        elif args.command in FRONT_DOOR:
            return run_front_door(args)
        elif args.command == "plot":
            from rlhf.tools.plot import plot_run

            for path in plot_run(args.run_dir):
                print(path)
    except (ConfigError, DataError) as e:  # bad input: nothing was trained
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, CheckpointError, PushError) as e:  # stopped cleanly (a run: what is on disk is intact)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except StoppedBySignal as e:
        print(f"[rlhf] {e}", file=sys.stderr)
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
