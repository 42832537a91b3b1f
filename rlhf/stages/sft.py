"""Stage 1: supervised fine-tuning on demonstrations (and, with `data.kind: text`, plain LM pretraining).

Next-token cross-entropy on completion tokens only (prompt and padding masked; `data.mask_prompt: false` puts
the prompt back). Batches are length-grouped and padded per micro-batch, never to a global maximum; with
`data.packing` they mix lengths and each micro-batch's rows are packed (`rlhf.data.packing`), attention never
crossing rows either way. Optional pretraining text is mixed into every batch at a fixed share (InstructGPT's RL
initial policy: 10%). Writes `<output_dir>/final/` in Hugging Face form with its tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from rlhf.algorithms import lm_loss
from rlhf.config import SFTConfig, TextSource, check_paths
from rlhf.data.batching import BatchSchedule, collate_lm
from rlhf.data.encoding import TruncationReport, encode_prompts, encode_sft, encode_text
from rlhf.data.packing import packed_micro_batches
from rlhf.data.sources import load_source
from rlhf.generation.sampling import log_generations
from rlhf.models.forwards import causal_logits, summed_lm_loss, token_units
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.packing import pack_length
from rlhf.runtime.accelerator import stage_accelerator
from rlhf.runtime.checkpoints import final_model, save_final
from rlhf.runtime.fit import Batch, SupervisedStage, fit, planned_steps
from rlhf.runtime.seeds import seed_everything


def train(cfg: SFTConfig, source: str = "<config>") -> Path:
    """Run SFT (or pretraining) to completion; returns `<output_dir>/final`."""
    check_paths(cfg, source)
    accelerator = stage_accelerator(cfg)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, fmt=cfg.data.format)
    data = load_lm_data(tokenizer, cfg)
    total_steps = planned_steps(cfg.train, data.schedule.steps_per_epoch)
    data.describe(accelerator, total_steps)
    sample_prompts = held_out_prompts(tokenizer, cfg)
    model = load_causal_lm(cfg.model, tokenizer)
    packed_length = pack_length(cfg.data, model, tokenizer)
    stage = SFTStage(cfg, accelerator, tokenizer, data, total_steps, sample_prompts, packed_length)
    return fit(cfg, accelerator, model, tokenizer, stage)


@dataclass
class LMData:
    """SFT's tokenized rows ({input_ids, labels}) and the schedules that pick each step's rows."""

    train: list[dict]
    eval: list[dict]
    mix: list[dict]  # pretraining rows mixed into every batch
    schedule: BatchSchedule
    mix_schedule: BatchSchedule | None
    report: TruncationReport  # what truncation did to the training rows

    def describe(self, accelerator: Accelerator, total_steps: int) -> None:
        mix_per_batch = self.mix_schedule.batch_size if self.mix_schedule is not None else 0
        report = self.report
        accelerator.print(
            f"[sft] {len(self.train)} examples, {self.schedule.steps_per_epoch} steps/epoch, {total_steps} steps; "
            f"{report.completions_cut} truncated, {report.dropped} dropped; {mix_per_batch} pretraining rows per batch"
        )
        if report.assistant_turns:
            accelerator.print(f"[sft] chat rows: {report.assistant_turns} assistant turns learnt (data.train_on)")
        if report.turns_fallback:
            accelerator.print(
                f"[sft] notice: the chat template cannot be split into turns for {report.turns_fallback} rows; they "
                "learn their last assistant turn only"
            )


def load_lm_examples(tokenizer, source: TextSource, kind: str, cfg: SFTConfig, report: TruncationReport) -> list:
    """Rows of a source -> tokenized {input_ids, labels} examples (prompt-masked for sft rows)."""
    ds = load_source(source, kind, on_bad_row=cfg.data.format.on_bad_row)
    if kind == "text":
        return encode_text(tokenizer, ds["text"], cfg.data.format.max_length, report)
    all_turns = cfg.data.train_on == "all_assistant_turns"
    return encode_sft(tokenizer, cfg.data.format, ds, source.path, cfg.data.mask_prompt, report, all_turns)


def load_lm_data(tokenizer, cfg: SFTConfig) -> LMData:
    """The training, held-out and pretraining-mix rows, and the schedules of the training and mix rows."""
    data = cfg.data
    report = TruncationReport()
    train_examples = load_lm_examples(tokenizer, data.train, data.kind, cfg, report)
    eval_examples = (
        load_lm_examples(tokenizer, data.eval, data.kind, cfg, TruncationReport()) if data.eval.path else []
    )
    mix_examples = (
        load_lm_examples(tokenizer, data.pretrain_mix, "text", cfg, TruncationReport())
        if data.pretrain_mix.path
        else []
    )
    mix_per_batch = round(data.pretrain_mix_ratio * cfg.train.batch_size)
    # packing fills sequences best from rows of mixed lengths; unpacked, rows of like length pad least
    by_length = not data.packing
    schedule = BatchSchedule(
        [len(e["input_ids"]) for e in train_examples],
        cfg.train.batch_size - mix_per_batch,
        cfg.seed,
        group_by_length=by_length,
        what=data.train.path,
    )
    mix_schedule = (
        BatchSchedule(
            [len(e["input_ids"]) for e in mix_examples],
            mix_per_batch,
            cfg.seed + 1,
            group_by_length=by_length,
            what=data.pretrain_mix.path,
        )
        if mix_per_batch
        else None
    )
    return LMData(train_examples, eval_examples, mix_examples, schedule, mix_schedule, report)


def held_out_prompts(tokenizer, cfg: SFTConfig) -> list[list[int]]:
    """The first logging.num_samples held-out prompts as the model sees them, sampled at each evaluation."""
    if cfg.data.kind != "sft" or not cfg.data.eval.path or not cfg.logging.num_samples:
        return []
    ds = load_source(cfg.data.eval, "sft", max_rows=cfg.logging.num_samples)
    return encode_prompts(tokenizer, cfg.data.format, ds.to_list())


def sft_loss(model, batch: Batch) -> tuple[torch.Tensor, dict]:
    """(next-token loss summed over the batch's labelled tokens, {"loss": the same}); batch tensors [B,T]."""
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


@dataclass
class SFTStage(SupervisedStage):
    """SFT as `fit` runs it: a unit is a token that carries loss."""

    cfg: SFTConfig
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    data: LMData
    total_steps: int
    sample_prompts: list[list[int]]
    packed_length: int  # 0: padded micro-batches
    name: str = field(init=False)

    def __post_init__(self):
        self.name = "sft" if self.cfg.data.kind == "sft" else "pretrain"

    def global_batch(self, step: int) -> list[dict]:
        rows = [self.data.train[j] for j in self.data.schedule(step)]
        if self.data.mix_schedule is not None:
            rows += [self.data.mix[j] for j in self.data.mix_schedule(step)]
        return rows

    def collate(self, rows: list[dict]) -> Batch:
        return collate_lm(rows, self.tokenizer.pad_token_id)

    def micro_batches(self, rows: list[dict], micro_batch_size: int) -> list[Batch]:
        if not self.packed_length:
            return super().micro_batches(rows, micro_batch_size)
        return packed_micro_batches(rows, self.packed_length, micro_batch_size, self.tokenizer.pad_token_id)

    def units(self, batch: Batch) -> torch.Tensor:
        return token_units(batch)

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        return sft_loss(model, batch)

    def evaluate(self, model, step: int) -> dict:
        cfg, metrics = self.cfg, {}
        if self.data.eval:
            pad_token_id = self.tokenizer.pad_token_id
            micro, max_batches = cfg.train.micro_batch_size, cfg.train.eval_max_batches
            metrics = eval_loss(model, self.data.eval, micro, pad_token_id, self.accelerator, max_batches)
        log_generations(self.accelerator, model, self.tokenizer, self.sample_prompts, cfg.output_dir, step)
        return metrics | self.data.report.as_metrics("data")

    def export_final(self, model, path: Path) -> None:
        unwrapped = final_model(self.accelerator, model, self.cfg.model.lora)
        save_final(self.accelerator, unwrapped, path, self.tokenizer, self.cfg)
