"""Stage 1: supervised fine-tuning on demonstrations (and, with `data.kind: text`, plain LM pretraining).

Next-token cross-entropy on completion tokens only (prompt and padding masked; `data.mask_prompt: false` puts
the prompt back). Batches are length-grouped and padded per micro-batch, never to a global maximum; with
`data.packing` they mix lengths and each micro-batch's rows are packed (`rlhf.data.packing`), attention never crossing
rows either way. Optional pretraining text mixed into every batch at a fixed share
(InstructGPT's RL initial policy: 10%). Writes `<output_dir>/final/` in Hugging Face form with its tokenizer.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from rlhf.algorithms import lm_loss
from rlhf.config import SFTConfig, TextSource, check_paths
from rlhf.data.batching import BatchSchedule, TruncationReport, collate_lm, encode_prompts, encode_sft, encode_text
from rlhf.data.packing import packed_micro_batches
from rlhf.data.sources import load_source
from rlhf.generation.sampling import log_generations
from rlhf.models.forwards import summed_lm_loss, token_units
from rlhf.models.loading import causal_logits, load_causal_lm, load_tokenizer
from rlhf.models.packing import pack_length
from rlhf.runtime.accelerator import seed_everything, stage_accelerator
from rlhf.runtime.checkpoints import final_model, save_final
from rlhf.runtime.fit import SupervisedTask, fit


def load_lm_examples(tokenizer, source: TextSource, kind: str, cfg: SFTConfig, report: TruncationReport) -> list:
    """Rows of a source -> tokenized {input_ids, labels} examples (prompt-masked for sft rows)."""
    ds = load_source(source, kind, on_bad_row=cfg.data.format.on_bad_row)
    if kind == "text":
        return encode_text(tokenizer, ds["text"], cfg.data.format.max_length, report)
    all_turns = cfg.data.train_on == "all_assistant_turns"
    return encode_sft(tokenizer, cfg.data.format, ds, source.path, cfg.data.mask_prompt, report, all_turns)


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    logits = causal_logits(model, batch["input_ids"], batch["attention_mask"], position_ids=batch.get("position_ids"))
    loss_sum = lm_loss(logits, batch["labels"], reduction="sum")
    return loss_sum, {"loss": loss_sum.detach()}


@torch.no_grad()
def eval_loss(model, examples: list, micro: int, pad_token_id: int, accelerator, max_batches: int = 0) -> dict:
    """Token-mean loss and perplexity over held-out examples (split across processes)."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    mine = [examples[i] for i in order[accelerator.process_index :: accelerator.num_processes]]
    if max_batches:
        mine = mine[: max_batches * micro]
    loss_sum, tokens = summed_lm_loss(model, mine, micro, pad_token_id, accelerator.device, accelerator.autocast)
    total = accelerator.reduce(torch.tensor([loss_sum, tokens], device=accelerator.device, dtype=torch.float64), "sum")
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50))}


def train(cfg: SFTConfig, source: str = "<config>") -> Path:
    """Run SFT (or pretraining) to completion; returns `<output_dir>/final`."""
    check_paths(cfg, source)
    accelerator = stage_accelerator(cfg)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, fmt=cfg.data.format)
    fmt = cfg.data.format

    report = TruncationReport()
    train_examples = load_lm_examples(tokenizer, cfg.data.train, cfg.data.kind, cfg, report)
    eval_examples = (
        load_lm_examples(tokenizer, cfg.data.eval, cfg.data.kind, cfg, TruncationReport())
        if cfg.data.eval.path
        else []
    )
    mix_examples = (
        load_lm_examples(tokenizer, cfg.data.pretrain_mix, "text", cfg, TruncationReport())
        if cfg.data.pretrain_mix.path
        else []
    )
    mix_per_batch = round(cfg.data.pretrain_mix_ratio * cfg.train.batch_size)
    # packing fills sequences best from rows of mixed lengths; unpacked, rows of like length pad least
    by_length = not cfg.data.packing
    schedule = BatchSchedule(
        [len(e["input_ids"]) for e in train_examples],
        cfg.train.batch_size - mix_per_batch,
        cfg.seed,
        group_by_length=by_length,
        what=cfg.data.train.path,
    )
    mix_schedule = (
        BatchSchedule(
            [len(e["input_ids"]) for e in mix_examples],
            mix_per_batch,
            cfg.seed + 1,
            group_by_length=by_length,
            what=cfg.data.pretrain_mix.path,
        )
        if mix_per_batch
        else None
    )
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * schedule.steps_per_epoch))
    accelerator.print(
        f"[sft] {len(train_examples)} examples, {schedule.steps_per_epoch} steps/epoch, {total_steps} steps; "
        f"{report.completions_cut} truncated, {report.dropped} dropped; {mix_per_batch} pretraining rows per batch"
    )
    if report.assistant_turns:
        accelerator.print(f"[sft] chat rows: {report.assistant_turns} assistant turns learnt (data.train_on)")
    if report.turns_fallback:
        accelerator.print(
            f"[sft] notice: the chat template cannot be split into turns for {report.turns_fallback} rows; they "
            "learn their last assistant turn only"
        )

    def global_batch(step: int) -> list:
        rows = [train_examples[j] for j in schedule(step)]
        if mix_schedule is not None:
            rows += [mix_examples[j] for j in mix_schedule(step)]
        return rows

    sample_prompts = []
    if cfg.data.kind == "sft" and cfg.data.eval.path and cfg.logging.num_samples:
        ds = load_source(cfg.data.eval, "sft", max_rows=cfg.logging.num_samples)
        sample_prompts = encode_prompts(tokenizer, fmt, ds.to_list())  # held-out prompts as the model sees them

    def evaluate(model, step: int) -> dict:
        metrics = (
            eval_loss(
                model,
                eval_examples,
                cfg.train.micro_batch_size,
                tokenizer.pad_token_id,
                accelerator,
                cfg.train.eval_max_batches,
            )
            if eval_examples
            else {}
        )
        log_generations(accelerator, model, tokenizer, sample_prompts, cfg.output_dir, step)
        return metrics | report.as_metrics("data")

    def write_final(model, path: Path) -> None:
        save_final(accelerator, final_model(accelerator, model, cfg.model.lora), path, tokenizer, cfg)

    model = load_causal_lm(cfg.model, tokenizer)
    micro_batches = None
    if packed_length := pack_length(cfg.data, model, tokenizer):
        micro_batches = functools.partial(
            packed_micro_batches,
            max_length=packed_length,
            micro_batch_size=cfg.train.micro_batch_size,
            pad_token_id=tokenizer.pad_token_id,
        )
    task = SupervisedTask(
        name="sft" if cfg.data.kind == "sft" else "pretrain",
        total_steps=total_steps,
        global_batch=global_batch,
        collate=lambda rows: collate_lm(rows, tokenizer.pad_token_id),
        units=token_units,
        loss=sft_loss,
        evaluate=evaluate,
        write_final=write_final,
        micro_batches=micro_batches,
    )
    return fit(cfg, accelerator, model, tokenizer, task)
