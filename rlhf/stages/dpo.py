"""Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290): the SFT policy trained directly on the
reward-model stage's comparisons — no reward model, no sampling, no value model.

Data: the same preference rows and loaders as the RM stage (`{prompt, chosen, rejected}` or `{prompt, ranked}`).
A prompt with K ranked responses gives all C(K,2) ordered pairs (better, worse). As in the RM stage, the unit of
a batch is the prompt: each of its responses is forwarded once (chosen and rejected together, in one forward
per micro-batch) and its pairs' losses are averaged, so every prompt weighs the same however many comparisons
it has (InstructGPT §3.5: reusing a comparison as separate batch elements overfits). With `share_prompt` each
distinct prompt of a micro-batch runs once and its responses on its KV cache (PPO's shared-prompt forwards).

Per pair, with log-probs summed over the response tokens only (prompt and padding masked),
`loss = -log σ(β [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])` (`dpo_loss` in
rlhf.algorithms, with cDPO label smoothing). The reference is the SFT model, frozen: a second copy, or with LoRA
the policy with its adapter disabled. Dropout is off in both, so at step 0 the policy equals the reference exactly.
The reference log-probs are computed on the fly (one no-grad forward per micro-batch) rather than precomputed over
the dataset: no pass before step 1, nothing to keep in step with truncation and resume, and with disable_adapter
no second model at all; precomputing would save that forward.

Built on `fit`: the same checkpoints, bit-exact resume, metrics.jsonl and `final/` (an HF causal LM with its
tokenizer, LoRA merged when `model.lora.merge_on_save`) as SFT and the reward model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from rlhf.algorithms import dpo_loss, logprobs_from_logits, masked_sum
from rlhf.config import ConfigError, DPOConfig, TextSource, check_paths
from rlhf.data.batching import length_batches, pad
from rlhf.data.encoding import TruncationReport
from rlhf.data.packing import pack_rows
from rlhf.data.preference import Group, PreferenceData, load_preference_data, load_ranked, ranking_index
from rlhf.generation.sampling import log_generations
from rlhf.models.forwards import causal_logits
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.packing import pack_length
from rlhf.models.shared_prompt import batch_prompt_groups, collate_shared_prompts, shared_response_logprobs
from rlhf.runtime.accelerator import prepare_frozen, stage_accelerator, stage_shares_prompt
from rlhf.runtime.checkpoints import final_model, save_final
from rlhf.runtime.fit import Batch, SupervisedStage, fit, planned_steps
from rlhf.runtime.seeds import seed_everything

# (policy, batch) -> the reference's sequence log-probs [N] of the batch, without gradient
RefLogps = Callable[[torch.nn.Module, Batch], torch.Tensor]


def train(cfg: DPOConfig, source: str = "<config>") -> Path:
    """Run DPO to completion; returns `<output_dir>/final` (loads with AutoModelForCausalLM)."""
    check_paths(cfg, source)
    if cfg.reference == "disable_adapter":
        check_adapter_reference(cfg)
    accelerator = stage_accelerator(cfg)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, fmt=cfg.data.format)
    data = load_preference_data(tokenizer, cfg.data, cfg.train.batch_size, cfg.seed)
    total_steps = planned_steps(cfg.train, data.schedule.steps_per_epoch)
    n_pairs = sum(math.comb(len(g), 2) for g in data.train)
    accelerator.print(
        f"[dpo] {len(data.train)} prompts, {n_pairs} pairs, {total_steps} steps, beta {cfg.beta}, "
        f"reference: {cfg.reference}; {data.report.describe()}"
    )
    # dropout off: with it the log-ratios are noisy and the policy would not start equal to its reference
    model = load_causal_lm(cfg.model, tokenizer, dropout=False)
    packed_length = pack_length(cfg.data, model, tokenizer)
    share_prompt = stage_shares_prompt(cfg.share_prompt, accelerator, "dpo")
    reference = load_reference(cfg, accelerator, tokenizer) if cfg.reference == "copy" else None
    stage = DPOStage(cfg, accelerator, tokenizer, data, total_steps, packed_length, share_prompt, reference)
    return fit(cfg, accelerator, model, tokenizer, stage)


def check_adapter_reference(cfg: DPOConfig) -> None:
    """Disabling the adapter gives the SFT model only when the policy's base weights *are* the merged SFT model."""
    if (Path(cfg.model.name_or_path) / "adapter_config.json").exists():
        raise ConfigError(
            f"reference: disable_adapter needs model.name_or_path to hold merged SFT weights, but "
            f"{cfg.model.name_or_path} is a peft adapter: disabling DPO's adapter would not give the SFT model. Save "
            "SFT with model.lora.merge_on_save: true, or use reference: copy"
        )


def load_reference(cfg: DPOConfig, accelerator: Accelerator, tokenizer) -> torch.nn.Module:
    """`reference: copy`: a second SFT model, frozen, and sharded like the policy under FSDP / ZeRO-3 (as PPO's
    reference)."""
    ref_cfg = copy.deepcopy(cfg.model)
    ref_cfg.lora.enabled, ref_cfg.gradient_checkpointing = False, False
    return prepare_frozen(accelerator, load_causal_lm(ref_cfg, tokenizer, dropout=False))


def load_groups(tokenizer, cfg: DPOConfig, source: TextSource, report: TruncationReport) -> list[Group]:
    """Preference rows -> groups of (prompt ids, response ids), best first; rendered exactly as in the RM stage."""
    return load_ranked(tokenizer, cfg.data.format, source, report)


def collate_groups(
    groups: list[Group], pad_token_id: int, pack_length: int = 0, share_prompt: bool = False
) -> dict[str, torch.Tensor]:
    """Every response of every group in one right-padded batch, plus every (better, worse) pair of each group.

    input_ids/attention_mask/response_mask [N, T] (response_mask: 1 on response tokens), pair_index [P, 2] rows
    of (chosen, rejected), group_index [P] the prompt of each pair. With pack_length the N sequences are packed
    into sequences of up to that many tokens instead (`rlhf.data.packing.pack_rows`: [S, W] with position_ids and
    row_index). With share_prompt, when some prompt repeats, prompts left-padded to the longest and responses
    right-padded after them ([N, P+R], as PPO's episodes), with `prompt_width` P and the sequences' prompt groups
    (`prompt_first` [U], `prompt_owner` [N]) for `sequence_logps` to run each distinct prompt once."""
    seqs = [prompt + response for group in groups for prompt, response in group]
    prompt_lengths = [len(prompt) for group in groups for prompt, _ in group]
    index = ranking_index([len(group) for group in groups], 0.0)
    pairs = {"pair_index": index["pair_index"], "group_index": index["group_index"]}
    if share_prompt:
        prompts = [prompt for group in groups for prompt, _ in group]
        responses = [response for group in groups for _, response in group]
        shared = collate_shared_prompts(prompts, responses, pad_token_id)
        if shared is not None:
            return shared | pairs
    if pack_length:
        packed = pack_rows(seqs, pack_length, pad_token_id)
        # a token is a response token when its position in its row is past that row's prompt
        starts = torch.tensor(prompt_lengths)[packed["row_index"].clamp(min=0)]
        response_mask = (packed["row_index"] >= 0) & (packed["position_ids"] >= starts)
        return packed | {"response_mask": response_mask.long(), "num_sequences": torch.tensor(len(seqs))} | pairs
    masks = [[0] * n + [1] * (len(s) - n) for s, n in zip(seqs, prompt_lengths)]
    return {
        "input_ids": pad(seqs, pad_token_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "response_mask": pad(masks, 0),
    } | pairs


def num_groups(batch: Batch) -> int:
    return int(batch["group_index"].max()) + 1


def sequence_logps(model, batch: Batch) -> torch.Tensor:
    """[N] log π(response | prompt): per-token log-probs summed over response tokens (prompt, padding masked);
    packed batches sum each row's tokens through `row_index` (a row's first token, a prompt token, is never a
    response token, so no row is predicted from another); shared-prompt batches (`collate_groups(share_prompt=
    True)`) run each distinct prompt once and its responses on its KV cache."""
    shared = batch_prompt_groups(batch)
    if shared is not None:
        groups, width = shared
        ids, mask = batch["input_ids"], batch["attention_mask"]
        token_logps = shared_response_logprobs(model, ids, mask, width, 1.0, groups)  # [N, R]
        return masked_sum(token_logps, batch["response_mask"][:, width:], dim=-1)
    position_ids = batch.get("position_ids")
    logits = causal_logits(model, batch["input_ids"], batch["attention_mask"], position_ids=position_ids)
    token_logps = logprobs_from_logits(logits[:, :-1], batch["input_ids"][:, 1:])  # logits at t predict token t+1
    if position_ids is None:
        return masked_sum(token_logps, batch["response_mask"][:, 1:], dim=-1)
    mask = batch["response_mask"][:, 1:].bool()
    rows = batch["row_index"][:, 1:][mask]
    n = int(batch["num_sequences"])
    return torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps[mask])


def per_group_sum(values: torch.Tensor, group_index: torch.Tensor, groups: int) -> torch.Tensor:
    """Σ over groups of the mean of `values` [P] over that group's pairs: a sum over prompts, as `fit` expects."""
    sums = torch.zeros(groups, dtype=values.dtype, device=values.device).index_add(0, group_index, values)
    counts = torch.bincount(group_index, minlength=groups).clamp(min=1).to(values.dtype)
    return (sums / counts).sum()


def preference_loss(
    model, ref_logps_fn: RefLogps, batch: Batch, beta: float, label_smoothing: float
) -> tuple[torch.Tensor, dict]:
    """(loss summed over the batch's prompts, stats summed over prompts): what `fit` divides by the step's prompts.

    One forward of the policy over all the batch's responses (chosen and rejected together); the reference
    log-probs come from `ref_logps_fn(model, batch)` without gradient."""
    with torch.no_grad():
        ref_logps = ref_logps_fn(model, batch)
    policy_logps = sequence_logps(model, batch)
    chosen, rejected = batch["pair_index"][:, 0], batch["pair_index"][:, 1]
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        policy_logps[chosen], policy_logps[rejected], ref_logps[chosen], ref_logps[rejected], beta, label_smoothing
    )
    groups, group_index = num_groups(batch), batch["group_index"]
    loss_sum = per_group_sum(loss, group_index, groups)
    with torch.no_grad():
        margin = chosen_rewards - rejected_rewards
        # ties count half: at step 0 the policy is the reference and every margin is exactly 0 (chance, not 0%)
        correct = (margin > 0).to(margin.dtype) + 0.5 * (margin == 0).to(margin.dtype)
        stats = {
            "loss": loss_sum.detach(),
            "accuracy": correct,
            "reward_margin": margin,
            "chosen_reward": chosen_rewards,
            "rejected_reward": rejected_rewards,
            # both falling together is DPO's known drift away from the data; worth watching
            "chosen_logp": policy_logps[chosen].detach().float(),
            "rejected_logp": policy_logps[rejected].detach().float(),
        }
        stats = {k: v if k == "loss" else per_group_sum(v, group_index, groups) for k, v in stats.items()}
    return loss_sum, stats


@torch.no_grad()
def evaluate_groups(
    model, ref_logps_fn: RefLogps, groups: list[Group], cfg: DPOConfig, pad_token_id: int, accelerator
) -> dict:
    """Held-out loss, preference accuracy (implicit reward of the better response higher; ties half), margins."""
    model.eval()
    mine = groups[accelerator.process_index :: accelerator.num_processes]
    micro = cfg.train.micro_batch_size
    names = ["loss", "accuracy", "reward_margin", "chosen_reward", "rejected_reward"]
    total = torch.zeros(len(names), dtype=torch.float64, device=accelerator.device)
    longest = [max(len(p) + len(r) for p, r in g) for g in mine]
    for index in length_batches(longest, micro):  # groups of like length: sums, in any order
        batch = collate_groups([mine[i] for i in index], pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            _, stats = preference_loss(model, ref_logps_fn, batch, cfg.beta, cfg.loss.label_smoothing)
        total += torch.stack([stats[k].double() for k in names])
    total = accelerator.reduce(total, "sum")
    return {f"eval/{k}": (v / max(len(groups), 1)).item() for k, v in zip(names, total)}


@dataclass
class DPOStage(SupervisedStage):
    """DPO as `fit` runs it: a unit is a prompt's group of ranked responses."""

    cfg: DPOConfig
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    data: PreferenceData
    total_steps: int
    packed_length: int  # 0: padded micro-batches
    share_prompt: bool
    reference: torch.nn.Module | None  # None: the policy with its adapter disabled
    name: str = "dpo"
    sample_prompts: list[list[int]] = field(init=False)

    def __post_init__(self):
        # held-out prompts as the model sees them (the rendered prompt of the first groups), sampled at each evaluation
        self.sample_prompts = [group[0][0] for group in self.data.eval[: self.cfg.logging.num_samples]]

    def reference_logps(self, policy, batch: Batch) -> torch.Tensor:
        """[N] the reference's sequence log-probs (the caller holds no_grad)."""
        if self.reference is not None:
            return sequence_logps(self.reference, batch)
        # the policy itself with its adapter off: base weights = SFT (no second copy in memory); the forward goes
        # through the (DDP/FSDP) wrapper like the policy's own
        with self.accelerator.unwrap_model(policy).disable_adapter():
            return sequence_logps(policy, batch)

    def global_batch(self, step: int) -> list[Group]:
        return [self.data.train[j] for j in self.data.schedule(step)]

    def collate(self, groups: list[Group]) -> Batch:
        return collate_groups(groups, self.tokenizer.pad_token_id, self.packed_length, self.share_prompt)

    def units(self, batch: Batch) -> int:
        return num_groups(batch)

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        return preference_loss(model, self.reference_logps, batch, cfg.beta, cfg.loss.label_smoothing)

    def evaluate(self, model, step: int) -> dict:
        accelerator, tokenizer = self.accelerator, self.tokenizer
        log_generations(accelerator, model, tokenizer, self.sample_prompts, self.cfg.output_dir, step)
        metrics = self.data.report.as_metrics("data")
        if self.data.eval:
            pad_token_id = tokenizer.pad_token_id
            metrics |= evaluate_groups(
                model, self.reference_logps, self.data.eval, self.cfg, pad_token_id, accelerator
            )
            accelerator.print(
                f"[dpo] step {step}: eval loss {metrics['eval/loss']:.4f}, accuracy {metrics['eval/accuracy']:.4f}"
            )
        return metrics

    def export_final(self, model, path: Path) -> None:
        unwrapped = final_model(self.accelerator, model, self.cfg.model.lora)
        save_final(self.accelerator, unwrapped, path, self.tokenizer, self.cfg)
