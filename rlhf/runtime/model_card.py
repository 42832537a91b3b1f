"""The model card every `final/` gets: README.md in the Hugging Face Hub's format (YAML front matter + Markdown).

Written inside the atomic publish of `final/` (`with_model_card` wraps the stage's writer in `publish_final`), from
the resolved config the stage saved there, so the card lands with the weights and never touches one. It names the
stage, the lineage as far as the input dirs tell it (their own cards or saved configs), the data, the settings that
matter, the held-out figures of the run's metrics.jsonl (and, given them, `rlhf eval`'s) and the library versions.
"""

from __future__ import annotations

import json
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

CARD = "README.md"
RUN_CONFIG = "rlhf_config.yaml"  # the resolved config a stage saves into final/
GENERATED = "<!-- model card written by rlhf; `rlhf push` refreshes it unless this line is removed -->"
LIBRARIES = ("torch", "transformers", "accelerate", "peft", "datasets", "tokenizers", "huggingface_hub")

STAGE_TAGS = {"pretrain": "pretraining", "sft": "sft", "rm": "reward-model", "dpo": "dpo", "ppo": "ppo"}
STAGE_TITLES = {
    "pretrain": "pretraining (the SFT stage on plain text)",
    "sft": "supervised fine-tuning (InstructGPT stage 1)",
    "rm": "reward model from rankings (InstructGPT stage 2)",
    "dpo": "Direct Preference Optimization",
    "ppo": "PPO against a reward model with a KL penalty (InstructGPT stage 3)",
}
COMMANDS = {"pretrain": "sft"}  # pretraining is the SFT stage with data.kind: text
PIPELINE_TAGS = {"pretrain": "text-generation", "sft": "text-generation", "dpo": "text-generation"}
PIPELINE_TAGS |= {"ppo": "text-generation", "rm": "text-classification"}

# the model dirs a stage starts from; the first is the one its weights come from
INPUTS = {
    "pretrain": ("model.name_or_path",),
    "sft": ("model.name_or_path",),
    "rm": ("model.name_or_path",),
    "dpo": ("model.name_or_path",),
    "ppo": ("models.policy.name_or_path", "models.reward.name_or_path"),
}
COMMON_SETTINGS = (
    "seed",
    "optim.lr",
    "optim.scheduler",
    "optim.warmup_steps",
    "train.max_steps",
    "train.epochs",
    "train.batch_size",
    "train.micro_batch_size",
    "train.mixed_precision",
)
STAGE_SETTINGS = {
    "pretrain": ("data.format.max_length",),
    "sft": ("data.pretrain_mix_ratio", "data.format.max_length", "model.lora.enabled"),
    "rm": ("ensemble.size", "ensemble.holdout", "ensemble.bootstrap", "loss.margin_coef", "model.lora.enabled"),
    "dpo": ("beta", "loss.label_smoothing", "reference", "model.lora.enabled"),
    "ppo": (
        "kl.kl_coef",
        "kl.adaptive",
        "kl.controller",
        "kl.target",
        "kl.estimator",
        "kl.placement",
        "kl.budget",
        "ppo.advantage",
        "ppo.ppo_epochs",
        "ppo.mini_batch_size",
        "ppo.cliprange",
        "ppo.vf_coef",
        "ppo.gamma",
        "ppo.lam",
        "rollout.max_new_tokens",
        "rollout.temperature",
        "ptx.ptx_coef",
        "ema.decay",
        "models.policy.lora.enabled",
    ),
}
ADAPTIVE_ONLY = ("kl.controller", "kl.target")  # meaningless with a fixed kl_coef
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow")


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def library_versions() -> dict[str, str]:
    """rlhf and the libraries a model card and `rlhf env` name, as installed."""
    return {name: package_version(name) for name in ("rlhf", *LIBRARIES)}


def get(config: dict, dotted: str, default=None):
    """config["a"]["b"] for "a.b" (default when any level is missing)."""
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def stage_of(config: dict) -> str | None:
    """The stage a resolved config belongs to (pretrain = the SFT stage on text), from the keys only its stage
    has; None for anything else (eval, a foreign file)."""
    if "models" in config:
        return "ppo"
    if "beta" in config:
        return "dpo"
    if "ensemble" in config:
        return "rm"
    if "model" in config and "data" in config:
        return "pretrain" if get(config, "data.kind") == "text" else "sft"
    return None


def read_yaml(path: Path) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def find_run_config(model_dir: str | Path) -> dict | None:
    """The resolved config that made a model dir: its own rlhf_config.yaml (a stage's final/), else the config.yaml
    one level up (a checkpoint's `checkpoint-N/<role>/`; a final/ that `rlhf eval` promoted from a checkpoint)."""
    model_dir = Path(model_dir)
    for path in (model_dir / RUN_CONFIG, model_dir.parent / "config.yaml"):
        if path.is_file() and (config := read_yaml(path)) is not None:
            return config
    return None


def read_front_matter(card: Path) -> dict:
    """The YAML front matter of a model card ({} when there is none)."""
    try:
        text = card.read_text(encoding="utf-8")
    except OSError:
        return {}
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    data = yaml.safe_load(match.group(1)) if match else None
    return data if isinstance(data, dict) else {}


def is_hub_id(name: str) -> bool:
    """`owner/name` that is not a path here: a Hugging Face Hub repo id."""
    return bool(HUB_ID.match(name)) and not Path(name).exists() and not name.endswith(DATA_SUFFIXES)


def describe_input(name: str, from_config: bool = False) -> tuple[str, str | None, bool]:
    """(one lineage line, the input it came from, whether that input gave only its config.json) for a model dir
    or hub name a stage started from."""
    path = Path(name)
    if from_config:
        return f"`{name}`: architecture only (config.json); the weights were trained from scratch", None, False
    if path.is_dir():
        config = find_run_config(path) or {}
        stage = stage_of(config) or read_stage_tag(path / CARD)
        if (path / "ensemble.json").is_file():
            return f"`{name}`: a reward-model ensemble (ensemble.json lists its members)", None, False
        if stage is None:
            return f"`{name}`: a model dir (no rlhf config: made elsewhere)", None, False
        upstream_from_config = stage == "pretrain" and bool(get(config, "model.from_config"))
        return f"`{name}`: made by the `{stage}` stage", get(config, INPUTS[stage][0]), upstream_from_config
    if is_hub_id(name):
        return f"[`{name}`](https://huggingface.co/{name}) on the Hugging Face Hub", None, False
    return f"`{name}` (not found from here)", None, False


def read_stage_tag(card: Path) -> str | None:
    tags = read_front_matter(card).get("tags") or []
    return next((stage for stage, tag in STAGE_TAGS.items() if tag in tags), None)


def lineage(config: dict, stage: str, max_depth: int = 8) -> tuple[list[list[str]], str | None]:
    """Per input model of the stage, its chain of lines back to where it started; and the base model: the first
    hub model up the chain of the weights' input (or a `base_model` an upstream card names)."""
    chains, base_model = [], None
    for i, key in enumerate(INPUTS[stage]):
        name = get(config, key)
        if not name:
            continue
        from_config = stage == "pretrain" and bool(get(config, "model.from_config"))
        chain, seen = [], set()
        while name and len(chain) < max_depth and name not in seen:
            seen.add(name)
            line, upstream, upstream_from_config = describe_input(str(name), from_config)
            chain.append(line)
            if i == 0 and base_model is None and not from_config:
                card_base = read_front_matter(Path(name) / CARD).get("base_model")
                base_model = card_base or (name if is_hub_id(str(name)) else None)
            name, from_config = upstream, upstream_from_config
        chains.append([f"{key}: {chain[0]}", *chain[1:]])
    return chains, base_model


def data_sources(config: dict, prefix: str = "") -> list[tuple[str, dict]]:
    """(dotted key, source) of every data source the config names (a node with a path and a field_map)."""
    found = []
    for key, value in config.items():
        if not isinstance(value, dict):
            continue
        dotted = f"{prefix}{key}"
        if "path" in value and "field_map" in value:
            if value["path"]:
                found.append((dotted, value))
        else:
            found.extend(data_sources(value, dotted + "."))
    return found


def settings(config: dict, stage: str) -> list[tuple[str, object]]:
    skip = set() if get(config, "kl.adaptive") else set(ADAPTIVE_ONLY)
    if get(config, "train.max_steps"):
        skip.add("train.epochs")  # max_steps decides the length
    keys = [k for k in COMMON_SETTINGS + STAGE_SETTINGS[stage] if k not in skip]
    return [(k, get(config, k)) for k in keys if get(config, k) is not None]


def run_metrics(output_dir: Path) -> tuple[int | None, list[tuple[str, float, int]]]:
    """(the last step logged, [(eval key, its last value, at step)]) from `<output_dir>/metrics.jsonl`."""
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return None, []
    last_step, evals = None, {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        step = row.get("step")
        last_step = step if isinstance(step, int) else last_step
        for k, v in row.items():
            if k.startswith("eval/") and isinstance(v, (int, float)) and not k.startswith("eval/data"):
                evals[k] = (v, step)
    return last_step, [(k, v, s) for k, (v, s) in sorted(evals.items())]


def prompt_format(config: dict) -> dict:
    return get(config, "data.format") or get(config, "format") or {}


def front_matter(config: dict, stage: str, base_model: str | None, ensemble: bool) -> dict:
    meta: dict = {"library_name": "transformers"}
    if base_model:
        meta["base_model"] = base_model
    meta["tags"] = ["rlhf", STAGE_TAGS[stage]] + (["ensemble"] if ensemble else [])
    if not ensemble:
        meta["pipeline_tag"] = PIPELINE_TAGS[stage]
    hub_data = sorted({s["path"] for _, s in data_sources(config) if is_hub_id(s["path"])})
    if hub_data:
        meta["datasets"] = hub_data
    return meta


def usage(stage: str, config: dict) -> list[str]:
    fmt = prompt_format(config)
    template = fmt.get("prompt_template", "{prompt}")
    chat = fmt.get("use_chat_template", "auto")
    auto = "AutoModelForSequenceClassification" if stage == "rm" else "AutoModelForCausalLM"
    lines = [
        "## Usage",
        "",
        f"Prompt format: the tokenizer's chat template when it has one (use_chat_template: {chat}), else "
        f"`{template}` with the response after one space. `rlhf chat <this dir>` and `rlhf generate` use it.",
        "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("<this repo or dir>")',
        f'model = {auto}.from_pretrained("<this repo or dir>")',
        "```",
    ]
    if stage == "rm":
        lines += ["", "The score is the logit at the last token; `config.reward_offset` centres it (subtract it)."]
    return lines


def table(rows: list[tuple], header: tuple[str, ...]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def model_card(final_dir: str | Path, config: dict, stage: str, eval_result: dict | None = None) -> str:
    """The README.md text of a stage's final/ (`final_dir` may be its `.tmp` name while it is being published)."""
    final_dir = Path(final_dir)
    output_dir = final_dir.parent
    ensemble = (final_dir / "ensemble.json").is_file()
    chains, base_model = lineage(config, stage)
    meta = front_matter(config, stage, base_model, ensemble)
    name = f"{output_dir.name}/final"
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        GENERATED,
        "",
        f"# {name}: {STAGE_TAGS[stage]}",
        "",
        f"Made by `rlhf {COMMANDS.get(stage, stage)}` of rlhf {package_version('rlhf')}: {STAGE_TITLES[stage]}.",
    ]
    if ensemble:
        lines.append("A reward-model ensemble: no weights here, `ensemble.json` lists the member dirs.")
    if re.fullmatch(r"member-\d+", output_dir.name):
        lines.append(f"One member ({output_dir.name}) of a reward-model ensemble.")
    lines += ["", "## Lineage", ""]
    for chain in chains:
        lines += [f"- {chain[0]}"] + [f"  - from {line}" for line in chain[1:]]
    if not chains:
        lines.append("- (no input model recorded)")
    sources = data_sources(config)
    lines += ["", "## Data", ""]
    lines += table([(k, f"`{s['path']}`") for k, s in sources], ("role", "source")) if sources else ["(none)"]
    last_step, evals = run_metrics(output_dir)
    lines += ["", "## Training settings", ""]
    rows = [(k, f"`{v}`") for k, v in settings(config, stage)]
    if last_step is not None:
        rows.append(("steps logged (metrics.jsonl)", last_step))
    lines += table(rows, ("key", "value"))
    if evals or eval_result:
        lines += ["", "## Evaluation", ""]
    if evals:
        lines += ["Held-out figures the run logged (last value of each):", ""]
        lines += table([(k, f"{v:.4g}", s) for k, v, s in evals], ("metric", "value", "step"))
    if eval_result:
        numbers = [(k, f"{v:.4g}") for k, v in sorted(eval_result.items()) if isinstance(v, (int, float))]
        lines += ["", "`rlhf eval` against the SFT model (eval.json):", ""] + table(numbers, ("metric", "value"))
    lines += [""] + usage(stage, config)
    lines += ["", "## Framework versions", ""]
    lines += [f"- {k}: {v}" for k, v in library_versions().items() if v != "not installed"]
    return "\n".join(lines) + "\n"


def write_model_card(
    final_dir: str | Path, cfg=None, stage: str | None = None, eval_result: dict | None = None
) -> Path | None:
    """Write `<final_dir>/README.md` from `cfg` (a stage's config dataclass or its dict; default: the config saved
    in final_dir). Returns its path, or None when the dir's config names no training stage (nothing written)."""
    final_dir = Path(final_dir)
    if cfg is None:
        config = find_run_config(final_dir)
    else:
        config = cfg if isinstance(cfg, dict) else _as_dict(cfg)
    stage = stage or (stage_of(config) if config else None)
    if not config or stage not in STAGE_TAGS:
        return None
    path = final_dir / CARD
    path.write_text(model_card(final_dir, config, stage, eval_result), encoding="utf-8")
    return path


def _as_dict(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def with_model_card(accelerator, write):
    """`write(tmp_dir)`, then the model card of what it wrote (main process): the writer `publish_final` commits.

    A card that cannot be written only warns: a finished training run is never lost over its README."""

    def write_with_card(tmp: Path) -> None:
        write(tmp)
        if accelerator.is_main_process:
            try:
                write_model_card(tmp)
            except Exception as e:  # the card is documentation; the weights beside it are what matter
                print(f"[rlhf] warning: no model card in {tmp.name}: {type(e).__name__}: {e}", flush=True)

    return write_with_card
