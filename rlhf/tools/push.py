"""`rlhf push RUN_OR_FINAL REPO`: upload a stage's `final/` to the Hugging Face Hub (huggingface_hub's HfApi:
create_repo, then upload_folder).

The dir must hold weights, a tokenizer and a model card (README.md); a card that is missing is written first from
the config saved with the model, and a card rlhf wrote is refreshed with `rlhf eval`'s figures when the run has an
eval.json for this model. Tested against a stand-in of the hub API only (the tests inject a fake HfApi): this
project's tests never reach the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.config import ConfigError
from rlhf.runtime.model_card import CARD, GENERATED, find_run_config, write_model_card

WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "adapter_model.bin")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
ENSEMBLE = "ensemble.json"


class PushError(RuntimeError):
    """The upload itself failed (authentication, network, the hub refused it)."""


def resolve_model_dir(path: str | Path) -> Path:
    """A stage's output dir -> its final/; a model dir as it is. A pipeline's run root (stage dirs with a final/
    each) is refused with the candidates named."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory")
    if (path / "final").is_dir():
        return path / "final"
    if has_weights(path) or (path / ENSEMBLE).is_file():
        return path
    finals = sorted(str(p) for p in path.glob("*/final") if p.is_dir())
    if finals:
        raise ConfigError(f"{path} holds several runs; name one: {', '.join(finals)}")
    raise ConfigError(f"{path} holds no final/ and no model weights")


def has_weights(model_dir: Path) -> bool:
    return any(any(model_dir.glob(pattern)) for pattern in WEIGHTS)


def check_model_dir(model_dir: Path) -> list[str]:
    """What a model repo needs and `model_dir` lacks (weights, tokenizer); a reward-model ensemble is refused: its
    members are separate dirs."""
    if (model_dir / ENSEMBLE).is_file():
        members = json.loads((model_dir / ENSEMBLE).read_text()).get("members", [])
        raise ConfigError(
            f"{model_dir} is a reward-model ensemble (its weights are in {', '.join(members)}): push a member's "
            "final/ instead"
        )
    missing = []
    if not has_weights(model_dir):
        missing.append(f"weights ({' / '.join(WEIGHTS)})")
    if not any((model_dir / name).is_file() for name in TOKENIZER):
        missing.append(f"a tokenizer ({' / '.join(TOKENIZER)})")
    return missing


def find_eval(model_dir: Path) -> dict | None:
    """The eval.json (`rlhf eval`'s policy-vs-SFT figures) of a sibling stage dir of this model's run whose
    `policy` is this dir, e.g. runs/tiny/eval/eval.json for runs/tiny/ppo/final (`policy` was written relative to
    the cwd of the eval run: within one run root, the stage dir and `final` name it)."""
    target = model_dir.resolve()
    for path in sorted(model_dir.parent.parent.glob("*/eval.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        policy = result.get("policy")
        if policy and (Path(policy).resolve() == target or Path(policy).parts[-2:] == target.parts[-2:]):
            return result
    return None


def prepare_card(model_dir: Path, dry_run: bool) -> str:
    """Make sure the card is there (writing or refreshing it unless `dry_run`); returns what was done."""
    card = model_dir / CARD
    ours = card.is_file() and GENERATED in card.read_text(encoding="utf-8")
    eval_result = find_eval(model_dir)
    if card.is_file() and not (ours and eval_result):
        return "model card present"
    if find_run_config(model_dir) is None:
        raise ConfigError(f"{model_dir} has no {CARD} and no saved rlhf config to write one from: add a model card")
    action = "refreshed with eval.json's figures" if card.is_file() else "written from the saved config"
    if not dry_run:
        write_model_card(model_dir, eval_result=eval_result)
    return f"model card {action}" if not dry_run else f"model card would be {action}"


def upload_files(model_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file())


def push(
    path: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    api=None,
) -> tuple[Path, list[str]]:
    """Upload the model dir `path` resolves to as the model repo `repo_id` (created if needed; `revision`: a branch,
    created if needed). `api`: an HfApi (default: a new one, authenticated by HF_TOKEN or `hf auth login`).
    Returns the dir and the files uploaded (with `dry_run`: that would be, nothing sent, nothing written)."""
    model_dir = resolve_model_dir(path)
    missing = check_model_dir(model_dir)
    if missing:
        raise ConfigError(f"{model_dir} is not a complete model: it lacks {'; '.join(missing)}")
    note = prepare_card(model_dir, dry_run)
    files = upload_files(model_dir)
    if dry_run:
        if CARD not in files:
            files = sorted([*files, CARD])
        print(f"[push] dry run: would upload {len(files)} files of {model_dir} to {repo_id} ({note}):")
        return model_dir, files
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(model_dir),
            repo_type="model",
            revision=revision,
            commit_message=f"rlhf push {model_dir}",
        )
    except Exception as e:  # the hub's errors (auth, network, refusals) share no base class worth naming here
        raise PushError(f"upload of {model_dir} to {repo_id} failed: {type(e).__name__}: {e}") from e
    print(f"[push] {model_dir} -> https://huggingface.co/{repo_id} ({len(files)} files; {note})")
    return model_dir, files
