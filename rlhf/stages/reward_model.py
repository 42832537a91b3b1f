"""Stage 2: the reward model — a scalar linear head on the SFT model, trained on K-way rankings.

For a prompt with K ranked responses, each response is forwarded once and all C(K,2) pairs form one loss term
`-1/C(K,2) Σ log σ(r_w - r_l)` (InstructGPT §3.5: fewer forwards, and no overfitting from reusing a comparison
as separate batch elements). Pairwise rows are K = 2. Identical responses (ties) are dropped by the loader.
With `data.packing` a micro-batch's responses are packed into sequences of up to max_length tokens
(`rlhf.data.packing`), each score read at its response's last token, instead of padded to the longest response.
With `share_prompt` each distinct prompt of a training micro-batch runs once and its responses on its KV cache.
After training the scores are shifted so the reference completions (SFT demonstrations) score mean 0; the shift
is stored as `reward_offset` in the saved config.json (stock HF decoder classification heads have no bias
parameter to hold it), and `rlhf.models.heads.reward_scores` applies it.

Ensembles (`ensemble.size: N`, Coste et al. 2023): N independent reward models, each a whole run of this stage in
`<output_dir>/member-<i>/` with seed `seed + i` (and, with `ensemble.bootstrap`, its own bootstrap resample of the
comparisons); each is resumable and loads with AutoModelForSequenceClassification. `<output_dir>/final/` then
holds `ensemble.json` (the members PPO scores with, and the `holdout` members it must not see: held-out proxies
for `rlhf eval`) and the tokenizer. Separate models rather than N heads on one trunk: members that share a trunk
share its errors, and a held-out proxy must not.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from transformers import PreTrainedTokenizerBase

from rlhf.algorithms import ranking_loss
from rlhf.config import ENSEMBLE_FILE, RMConfig, RMEnsemble, check_paths
from rlhf.data.batching import length_batches, pad
from rlhf.data.encoding import TruncationReport, encode_pairs, encode_prompts
from rlhf.data.packing import pack_rows
from rlhf.data.preference import Group, PreferenceData, joined, load_preference_data, ranking_index
from rlhf.data.sources import load_source
from rlhf.models.heads import TokenValueModel, reward_scores, score_sequences, token_values
from rlhf.models.loading import load_reward_model, load_tokenizer
from rlhf.models.packing import pack_length
from rlhf.models.shared_prompt import batch_prompt_groups, collate_shared_prompts, shared_token_values
from rlhf.runtime.accelerator import stage_accelerator, stage_shares_prompt
from rlhf.runtime.checkpoints import final_model, publish_final, save_final, save_run_record
from rlhf.runtime.fit import Batch, SupervisedStage, fit, planned_steps
from rlhf.runtime.run_identity import check_resume
from rlhf.runtime.seeds import seed_everything
from rlhf.runtime.tracking import write_json


def train(cfg: RMConfig, source: str = "<config>") -> Path:
    """Train the reward model (or, with ensemble.size > 1, every member); returns `<output_dir>/final`.

    A single RM's `final/` loads with AutoModelForSequenceClassification; an ensemble's `final/` is the manifest
    that `rlhf.models.loading.reward_members` reads.
    """
    check_paths(cfg, source)
    if cfg.ensemble.size == 1:
        return train_one(cfg, bootstrap_seed=None)
    configs = [member_config(cfg, i) for i in range(cfg.ensemble.size)]
    for member in configs:  # every member's resume is the run it resumes, before the first member trains
        check_resume(member, source, "rm")
    members = []
    for i, member in enumerate(configs):
        final = Path(member.output_dir) / "final"
        if final.is_dir():
            print(f"[rm] ensemble member-{i} of {cfg.ensemble.size}: finished already ({final}), skipped")
        else:
            print(f"[rm] ensemble member-{i} of {cfg.ensemble.size} (seed {member.seed})", flush=True)
            train_one(member, bootstrap_seed=member.seed if cfg.ensemble.bootstrap else None)
        members.append(final)
    return write_ensemble_manifest(cfg, members)


def member_config(cfg: RMConfig, i: int) -> RMConfig:
    """Ensemble member i's own config: its dir `<output_dir>/member-<i>`, seed `seed + i`, no ensemble."""
    member = copy.deepcopy(cfg)
    member.output_dir = str(Path(cfg.output_dir) / f"member-{i}")
    member.seed = cfg.seed + i
    member.ensemble = RMEnsemble()
    return member


def train_one(cfg: RMConfig, bootstrap_seed: int | None) -> Path:
    """Train one reward model (on a bootstrap resample of the comparison groups when bootstrap_seed is set)."""
    accelerator = stage_accelerator(cfg)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, fmt=cfg.data.format)
    share_prompt = stage_shares_prompt(cfg.share_prompt, accelerator, "rm")
    data = load_preference_data(tokenizer, cfg.data, cfg.train.batch_size, cfg.seed, bootstrap_seed)
    total_steps = planned_steps(cfg.train, data.schedule.steps_per_epoch)
    k_mean = sum(len(g) for g in data.train) / len(data.train)
    accelerator.print(
        f"[rm] {len(data.train)} prompts (mean K {k_mean:.1f}), {total_steps} steps; {data.report.describe()}"
    )
    # one module whose forward scores every token, so training goes through DDP/FSDP wrappers
    model = TokenValueModel(
        load_reward_model(cfg.model, tokenizer, train=True, new_head=True, key="model.name_or_path")
    )
    packed_length = pack_length(cfg.data, model, tokenizer, lambda ids, am, pos: model(ids, am, pos)[..., None])
    stage = RewardModelStage(cfg, accelerator, tokenizer, data, total_steps, share_prompt, packed_length)
    return fit(cfg, accelerator, model, tokenizer, stage)


def write_ensemble_manifest(cfg: RMConfig, members: list[Path]) -> Path:
    """`<output_dir>/final/`: ensemble.json (member paths relative to it), the tokenizer and the config; atomic."""
    state = PartialState()
    used = len(members) - cfg.ensemble.holdout

    def write(tmp: Path) -> None:
        if state.is_main_process:
            write_json(
                tmp / ENSEMBLE_FILE,
                {
                    "members": [f"../{m.parent.name}/final" for m in members[:used]],
                    "holdout": [f"../{m.parent.name}/final" for m in members[used:]],
                    "bootstrap": cfg.ensemble.bootstrap,
                },
            )
            load_tokenizer(str(members[0])).save_pretrained(str(tmp))
            save_run_record(cfg, tmp)

    return publish_final(state, cfg.output_dir, write, {})


def collate_groups(
    groups: list[list[list[int]]], pad_token_id: int, margin_coef: float, pack_length: int = 0
) -> dict[str, torch.Tensor]:
    """Groups of whole sequences -> one right-padded batch: input_ids, attention_mask [N, T] (or, with pack_length,
    sequences of up to that many tokens packed by best fit: `rlhf.data.packing.pack_rows`), and every pair (i better
    than j) of each group (`ranking_index`)."""
    seqs = [seq for group in groups for seq in group]
    tokens = (
        pack_rows(seqs, pack_length, pad_token_id)
        if pack_length
        else {"input_ids": pad(seqs, pad_token_id), "attention_mask": pad([[1] * len(s) for s in seqs], 0)}
    )
    return tokens | ranking_index([len(group) for group in groups], margin_coef)


def collate_shared_prompt(groups: list[Group], pad_token_id: int, margin_coef: float) -> dict[str, torch.Tensor]:
    """`collate_groups` for share_prompt: groups of (prompt ids, response ids) laid out by `collate_shared_prompts`
    for `sequence_scores` to run each distinct prompt once; the whole sequences, right-padded, when no prompt
    repeats."""
    prompts = [prompt for group in groups for prompt, _ in group]
    responses = [response for group in groups for _, response in group]
    shared = collate_shared_prompts(prompts, responses, pad_token_id)
    if shared is None:
        return collate_groups(joined(groups), pad_token_id, margin_coef)
    return shared | ranking_index([len(group) for group in groups], margin_coef)


def sequence_scores(model, batch: Batch) -> torch.Tensor:
    """[N] raw scores of a batch's sequences (padded, or packed: read at each row's last token). Shared-prompt
    batches (`collate_shared_prompt`) run each distinct prompt once, inside the TokenValueModel's forward (so
    through its DDP wrapper), and read each score at its response's last token."""
    shared = batch_prompt_groups(batch)
    if shared is not None:
        groups, width = shared

        def shared_values(inner, input_ids, attention_mask, _positions):
            return shared_token_values(inner, input_ids, attention_mask, width, groups)  # [N, 1+R]

        values = model(batch["input_ids"], batch["attention_mask"], values=shared_values)
        last = batch["attention_mask"][:, width:].sum(1, keepdim=True)  # column 0 is the prompt's last token
        return values.gather(1, last).squeeze(1)
    if "position_ids" in batch:
        values = token_values(model, batch["input_ids"], None, batch["position_ids"])
        return values.reshape(-1)[batch["last_index"]]
    return reward_scores(model, batch["input_ids"], batch["attention_mask"], normalized=False)


def group_loss(model, batch: Batch, center_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Loss summed over the batch's groups, and stats summed over groups (accuracy/margin weighted by groups)."""
    num_groups = int(batch["seq_group"].max()) + 1
    scores = sequence_scores(model, batch)
    margin = batch["margin"] if bool((batch["margin"] != 0).any()) else None
    loss, stats = ranking_loss(scores, batch["pair_index"], batch["group_index"], num_groups, margin)
    loss_sum = loss * num_groups
    if center_coef:
        # Eisenstein et al. 2023: keep rewards near zero, so the scale is identifiable (sum over groups of mean r²)
        per_group = torch.zeros(num_groups, device=scores.device).index_add(0, batch["seq_group"], scores.float() ** 2)
        counts = torch.bincount(batch["seq_group"], minlength=num_groups).clamp(min=1)
        loss_sum = loss_sum + center_coef * (per_group / counts).sum()
    return loss_sum, {
        "loss": loss_sum.detach(),
        "accuracy": stats["accuracy"] * num_groups,
        "margin": stats["margin_mean"] * num_groups,
    }


@torch.no_grad()
def evaluate_groups(model, groups, micro: int, pad_token_id: int, accelerator) -> dict:
    """Held-out pairwise accuracy (ties half), mean margin r_w - r_l and loss, over all pairs of all groups (groups
    of whole sequences)."""
    model.eval()
    total = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss*groups, correct, margin, pairs
    mine = groups[accelerator.process_index :: accelerator.num_processes]
    for index in length_batches([max(map(len, g)) for g in mine], micro):  # lists of like length: sums, in any order
        chunk = [mine[i] for i in index]
        batch = {k: v.to(accelerator.device) for k, v in collate_groups(chunk, pad_token_id, 0).items()}
        with accelerator.autocast():
            scores = reward_scores(model, batch["input_ids"], batch["attention_mask"], normalized=False).float()
        n = len(chunk)
        loss, _ = ranking_loss(scores, batch["pair_index"], batch["group_index"], n)
        diff = scores[batch["pair_index"][:, 0]] - scores[batch["pair_index"][:, 1]]
        total += torch.stack(
            [
                loss * n,
                (diff > 0).sum() + 0.5 * (diff == 0).sum(),
                diff.sum(),
                torch.tensor(float(len(diff)), device=diff.device),
            ]
        ).double()
    total = accelerator.reduce(total, "sum")
    pairs = total[3].clamp(min=1)
    return {
        "eval/loss": (total[0] / max(len(groups), 1)).item(),
        "eval/accuracy": (total[1] / pairs).item(),
        "eval/margin": (total[2] / pairs).item(),
    }


def reference_sequences(tokenizer, cfg: RMConfig) -> list[list[int]]:
    """Reference (prompt, completion) sequences whose mean score becomes 0 after normalisation."""
    src = cfg.data.reference
    ds = load_source(src, "sft", on_bad_row=cfg.data.format.on_bad_row, max_rows=cfg.data.reference_max_rows or None)
    rows = ds.to_list()
    report = TruncationReport()
    prompts = encode_prompts(tokenizer, cfg.data.format, rows, report, source=src.path)
    pairs = encode_pairs(tokenizer, cfg.data.format, prompts, [r["completion"] for r in rows], src.path, report)
    return [p + c for p, c in (x for x in pairs if x is not None)]


@dataclass
class RewardModelStage(SupervisedStage):
    """The reward model as `fit` runs it: a unit is a prompt's group of ranked responses."""

    cfg: RMConfig
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    data: PreferenceData
    total_steps: int
    share_prompt: bool
    packed_length: int  # 0: padded micro-batches
    name: str = "rm"

    def global_batch(self, step: int) -> list[Group]:
        return [self.data.train[j] for j in self.data.schedule(step)]

    def collate(self, groups: list[Group]) -> Batch:
        pad_token_id, margin_coef = self.tokenizer.pad_token_id, self.cfg.loss.margin_coef
        if self.share_prompt:
            return collate_shared_prompt(groups, pad_token_id, margin_coef)
        return collate_groups(joined(groups), pad_token_id, margin_coef, self.packed_length)

    def units(self, batch: Batch) -> int:
        return int(batch["seq_group"].max()) + 1

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        return group_loss(model, batch, self.cfg.loss.center_coef)

    def evaluate(self, model, step: int) -> dict:
        metrics = self.data.report.as_metrics("data")
        if self.data.eval:
            micro, pad_token_id = self.cfg.train.micro_batch_size, self.tokenizer.pad_token_id
            metrics |= evaluate_groups(model, joined(self.data.eval), micro, pad_token_id, self.accelerator)
            self.accelerator.print(f"[rm] step {step}: eval accuracy {metrics['eval/accuracy']:.4f}")
        return metrics

    def export_final(self, model, path: Path) -> None:
        """The trained RM with `reward_offset` (the reference completions' mean raw score) in its config.json."""
        cfg, accelerator = self.cfg, self.accelerator
        unwrapped = final_model(accelerator, model, cfg.model.lora)
        offset, n_ref = 0.0, 0
        if cfg.data.reference.path:
            refs = reference_sequences(self.tokenizer, cfg)
            micro, pad_token_id = cfg.train.micro_batch_size * 4, self.tokenizer.pad_token_id
            offset = score_sequences(unwrapped, refs, micro, pad_token_id, accelerator.device).double().mean().item()
            n_ref = len(refs)
        getattr(unwrapped, "module", unwrapped).config.reward_offset = offset  # the HF config inside any wrapper
        save_final(accelerator, unwrapped, path, self.tokenizer, cfg)
        if accelerator.is_main_process:
            write_json(
                path / "reward_normalization.json",
                {"reward_offset": offset, "reference_rows": n_ref, "reference": cfg.data.reference.path},
            )
        accelerator.print(f"[rm] reward_offset {offset:.5f} from {n_ref} reference completions")
