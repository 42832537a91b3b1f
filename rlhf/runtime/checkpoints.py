"""Checkpoints and resume, and the final model.

A checkpoint is `<output_dir>/checkpoint-<step>/`: `model/` (or one dir per trained role) in Hugging Face form,
`state/` written by `accelerator.save_state` (optimizer, scheduler, RNG of every process, registered objects
such as the step counter and the KL controller), `config.yaml` and `checkpoint.json` (every file with its size).
It is written under a `.tmp` name and renamed when complete, so a crash never leaves a half checkpoint that
`resume: auto` would take; a checkpoint damaged later (truncated, corrupted) is detected and the previous one used.
A failed save leaves the previous checkpoint intact and says why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from rlhf.config import LoraConfig, save_config
from rlhf.models.heads import TokenValueModel
from rlhf.runtime.accelerator import sharded_parameters
from rlhf.runtime.guards import check_finite_weights
from rlhf.runtime.model_card import RUN_CONFIG, with_model_card
from rlhf.runtime.provenance import PROVENANCE_FILE
from rlhf.runtime.tracking import write_json


@dataclass
class Progress:
    """The training position: registered with accelerate so it is saved and restored with every checkpoint."""

    step: int = 0
    samples: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples = int(state["step"]), int(state["samples"])


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` dir is an interrupted save and never counts)."""
    out = Path(output_dir)
    dirs = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[-1]))


MANIFEST = "checkpoint.json"


def write_manifest(directory: Path, step: int) -> None:
    """checkpoint.json: every file of the checkpoint with its size, so a truncated file is detected on resume."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    write_json(directory / MANIFEST, {"step": step, "files": files})


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint dir cannot be resumed from (None if it looks complete): no state/, or a file missing or of
    another size than its manifest recorded. A checkpoint without a manifest is trusted."""
    if not (path / "state").is_dir():
        return "no state/ inside"
    manifest = path / MANIFEST
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, OSError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def resume_state(accelerator: Accelerator, resume: str, output_dir: str | Path, name: str) -> Path | None:
    """Load the training state to resume from and return its checkpoint dir (None: start fresh).

    `auto` tries the newest complete checkpoint; one that is damaged (its manifest disagrees with the files, or
    loading fails) is skipped with a warning for the previous one; if checkpoints exist but none is usable the
    run stops (CheckpointError) rather than silently start over. An explicit path must be usable itself."""
    if resume == "never":
        return None
    explicit = resume != "auto"
    candidates = [Path(resume)] if explicit else checkpoint_dirs(output_dir)[::-1]
    tried = []
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            try:
                accelerator.load_state(str(ckpt / "state"))
            except Exception as e:  # any failure to read the state means this checkpoint is unusable
                problem = f"cannot be loaded ({type(e).__name__}: {str(e)[:200]})"
        if problem is None:
            if tried:
                accelerator.print(f"[{name}] warning: resuming from {ckpt.name}, skipped {'; '.join(tried)}")
            return ckpt
        tried.append(f"{ckpt.name} ({problem})")
        accelerator.print(f"[{name}] warning: checkpoint {ckpt} is unusable: {problem}")
    if explicit:
        raise CheckpointError(f"resume: {resume} is not a usable checkpoint: {tried[0]}. Fix resume: or use auto")
    if tried:
        raise CheckpointError(
            f"no usable checkpoint in {output_dir}: {'; '.join(tried)}. Delete them to start over (or set "
            "resume: never)"
        )
    return None


def publish_atomically(accelerator: Accelerator, target: Path, write, step: int | None = None) -> Path:
    """Run `write(tmp_dir)` on every process, then rename `<target>.tmp` -> `target`: the dir exists only complete.

    With `step`, a manifest of the files is written last (a checkpoint). An OSError (full disk, read-only dir)
    removes the partial dir and raises CheckpointError: whatever `target` held before is untouched until the rename.
    """
    tmp = target.with_name(target.name + ".tmp")
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        write(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if step is not None:
                write_manifest(tmp, step)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
    except OSError as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in checkpoint_dirs(target.parent)]
        raise CheckpointError(
            f"could not write {target}: {e.strerror or e} ({type(e).__name__}). Nothing already written was "
            f"touched (complete checkpoints: {', '.join(previous) or 'none'}). Free disk space or make "
            f"{target.parent} writable, then run the same command to resume"
        ) from e
    accelerator.wait_for_everyone()
    return target


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, step: int, models: dict[str, Any], tokenizer, cfg, keep_last: int
) -> Path:
    """Write checkpoint-<step> atomically and prune to the newest `keep_last`."""

    def write(tmp: Path) -> None:
        with _tied_weights_not_reported():
            accelerator.save_state(str(tmp / "state"))
        for name, model in models.items():
            save_hf(accelerator, model, tmp / name, tokenizer)
        if accelerator.is_main_process:
            save_config(cfg, tmp / "config.yaml")

    check_finite_weights(accelerator, models, f"checkpoint-{step}")
    final = publish_atomically(accelerator, Path(output_dir) / f"checkpoint-{step}", write, step=step)
    if accelerator.is_main_process and keep_last:
        for old in checkpoint_dirs(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class _TiedWeightsFilter(logging.Filter):
    """Drops accelerate's "Removed shared tensor {'lm_head.weight'} while saving" for tied output embeddings: the
    output layer shares the input embedding's storage, safetensors stores shared storage once, and loading the
    state re-ties it, so nothing is lost. Any other shared tensor it names is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Removed shared tensor" not in message:
            return True
        names = re.findall(r"'([^']+)'", message.split("Removed shared tensor")[1].split(" while saving")[0])
        return not names or not all(n.endswith("lm_head.weight") for n in names)


@contextlib.contextmanager
def _tied_weights_not_reported():
    logger = logging.getLogger("accelerate.utils.other")
    drop = _TiedWeightsFilter()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def save_hf(accelerator: Accelerator, model, path: Path, tokenizer=None) -> None:
    """save_pretrained of the unwrapped model (a peft model saves its adapter) plus the tokenizer."""
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(str(path), state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))


def publish_final(accelerator: Accelerator, output_dir: str | Path, write, models: dict[str, Any]) -> Path:
    """`<output_dir>/final`, written by `write(tmp_dir)`, exists only when complete (and `models` are finite)."""
    check_finite_weights(accelerator, models, "final/")
    return publish_atomically(accelerator, Path(output_dir) / "final", with_model_card(accelerator, write))


def final_model(accelerator: Accelerator, model, lora: LoraConfig):
    """The trained model as `final/` holds it: unwrapped, with LoRA merged into the weights when asked.

    With sharded parameters (FSDP, ZeRO-3) the wrapped model is returned: save_final gathers its full state dict.
    """
    if sharded_parameters(accelerator):
        return model
    unwrapped = accelerator.unwrap_model(model)
    if isinstance(unwrapped, TokenValueModel):  # a trained reward/value model is saved as its HF model
        unwrapped = unwrapped.model
    return unwrapped.merge_and_unload() if lora.enabled and lora.merge_on_save else unwrapped


def save_final(accelerator: Accelerator, model, path: Path, tokenizer, cfg) -> None:
    """`final/` in Hugging Face form: the model (or peft adapter), its tokenizer and the resolved config.

    With sharded parameters every process takes part in gathering the full state dict (accelerate's
    `get_state_dict`: FSDP full-state-dict, ZeRO-3 16-bit consolidation) and rank 0 writes it; a LoRA adapter is then
    saved unmerged (merging needs the whole model on one device: `peft`'s merge_and_unload on the saved adapter).
    """
    if sharded_parameters(accelerator):
        save_hf(accelerator, model, path, tokenizer)
        if accelerator.is_main_process:
            save_run_record(cfg, path)
        return
    if accelerator.is_main_process:
        model.save_pretrained(str(path), safe_serialization=True)
        tokenizer.save_pretrained(str(path))
        save_run_record(cfg, path)


def save_run_record(cfg, path: Path) -> None:
    """What made a final/: the resolved config (rlhf_config.yaml) and the run's provenance.json, so a model dir
    copied anywhere still says how it was made and a later stage can fingerprint it by its record."""
    save_config(cfg, path / RUN_CONFIG)
    recorded = Path(cfg.output_dir) / PROVENANCE_FILE
    if recorded.is_file():
        shutil.copyfile(recorded, path / PROVENANCE_FILE)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or no usable one can be read; the message says what is intact and what to do."""
