"""The experience maker: prompts in, a finished `Rollout` out — generate, score, per-token rewards, advantages.

    make(step):  1. sample this process's share of the iteration's episodes (`ResponseGenerator`)
                 2. score them: old and reference log-probs, values, reward-model / function scores; gather every
                    process's episodes; missing-EOS penalty, optional normalisation and clipping
    advantages(ro): 3. r_t = -beta * KL_t (+ the score at the last token), kl.placement: loss leaves the KL out
                 4. ADVANTAGE_ESTIMATORS[ppo.advantage]; the iteration's statistics (KL, scores, collapse signs)

The learner reads only the `Rollout` this returns.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rlhf.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_PLACEMENTS,
    AdvantageSettings,
    compute_rewards,
    distinct_n,
    explained_variance,
    kl_penalty,
    masked_whiten,
    truncate_after_eos,
)
from rlhf.algorithms.collapse import repeat_share
from rlhf.algorithms.kl_control import penalty_share
from rlhf.config import PPOConfig
from rlhf.data.batching import BatchSchedule, TruncationReport, aligned_batches, encode_prompts, pad
from rlhf.data.sources import load_source
from rlhf.generation.generator import HFGenerator
from rlhf.generation.sampling import episode_seed
from rlhf.models.shared_prompt import (
    logprobs_forward,
    prompt_groups,
    shared_prefill,
    values_forward,
)
from rlhf.runtime.accelerator import sharded_parameters
from rlhf.stages.ppo.roles import Roles
from rlhf.stages.ppo.rollout import ROLLOUT_STREAM, Rollout, real_columns
from rlhf.stages.ppo.scoring import Scorer
from rlhf.stages.ppo.state import RunningMoments


@dataclass
class Prompts:
    """The training prompts (rendered exactly as in SFT and RM) and their schedule; the optional held-out ones."""

    rows: list[dict]
    ids: list[list[int]]
    schedule: BatchSchedule
    report: TruncationReport
    eval_rows: list[dict] = field(default_factory=list)
    eval_ids: list[list[int]] = field(default_factory=list)


def load_prompts(cfg: PPOConfig, tokenizer) -> Prompts:
    fmt = cfg.data.format
    report = TruncationReport()
    rows = load_source(cfg.data.prompts, "prompts", on_bad_row=fmt.on_bad_row).to_list()
    ids = encode_prompts(tokenizer, fmt, rows, report)
    schedule = BatchSchedule(
        [len(p) for p in ids],
        cfg.train.batch_size // cfg.rollout.samples_per_prompt,  # prompts per iteration
        cfg.seed,
        group_by_length=False,
        what=cfg.data.prompts.path,
    )
    prompts = Prompts(rows, ids, schedule, report)
    if cfg.data.eval_prompts.path:
        prompts.eval_rows = load_source(cfg.data.eval_prompts, "prompts", on_bad_row=fmt.on_bad_row).to_list()
        prompts.eval_ids = encode_prompts(tokenizer, fmt, prompts.eval_rows)
    return prompts


class ExperienceMaker:
    """Turns an iteration's prompts into a scored `Rollout` with rewards and advantages (see the module doc).

    Reads the KL controller's beta and updates the score normaliser's moments; holds no other state."""

    def __init__(self, cfg: PPOConfig, acc, roles: Roles, prompts: Prompts, kl_ctl, score_moments: RunningMoments):
        self.cfg, self.accelerator, self.roles, self.prompts = cfg, acc, roles, prompts
        self.kl_ctl, self.score_moments = kl_ctl, score_moments
        self.tokenizer = roles.tokenizer
        self.scorer = Scorer(cfg, roles)
        # one optimizer step per rollout with the KL out of the reward: the update's forward gives the old log-probs
        self.old_logprobs_from_update = cfg.old_logprobs_from_update()
        # a group's prompt is prefilled once for its k samples as it is scored once (rollout.share_prompt)
        share, _ = cfg.prompt_sharing(sharded_parameters(acc))
        self.generator = HFGenerator(
            acc, roles.policy, roles.tokenizer, cfg.rollout, prefill=shared_prefill if share else None
        )

    def episode_rows(self, step: int) -> list[int]:
        """Prompt row of each of iteration `step`'s episodes, in the global order (a pure function of the step);
        the rollout.samples_per_prompt responses to a prompt are consecutive episodes (a group)."""
        k = self.cfg.rollout.samples_per_prompt
        return [row for row in self.prompts.schedule(step) for _ in range(k)]

    @torch.no_grad()
    def make(self, step: int) -> tuple[Rollout, dict]:
        """Sample and score this process's share of the iteration's episodes; returns every process's episodes.

        Episode i of the iteration is sampled on process i % num_processes with its own random stream (seeded by
        run seed, iteration and i) and prompts are left-padded to the widest prompt of the whole iteration, so the
        gathered rollout is the one a single process would sample (up to float rounding in the forwards).
        """
        cfg, acc, tok = self.cfg, self.accelerator, self.tokenizer
        episodes = self.episode_rows(step)
        positions = list(range(acc.process_index, len(episodes), acc.num_processes))
        row_ids = [episodes[i] for i in positions]
        prompts = [self.prompts.ids[j] for j in row_ids]
        rows = [self.prompts.rows[j] for j in row_ids]
        seeds = [episode_seed(cfg.seed, ROLLOUT_STREAM, step, i) for i in positions]
        t0 = time.time()
        # 1. sample: one left-padded prompt tensor so every chunk shares the prompt width P
        P = max(len(self.prompts.ids[j]) for j in episodes)
        prompt_ids = pad(prompts, tok.pad_token_id, side="left", width=P)
        prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left", width=P)
        responses = self.generator.generate(prompts, seeds)
        responses, response_mask = truncate_after_eos(responses, tok.eos_token_id, tok.pad_token_id)
        ended = (responses == tok.eos_token_id).any(-1)
        query_responses = torch.cat([prompt_ids.to(acc.device), responses], 1)
        attention_mask = torch.cat([prompt_mask.to(acc.device), response_mask.long()], 1)
        t1 = time.time()

        # 2. score: old log-probs (unless the update's forward gives them), reference log-probs, values, RM scores;
        # micro-batched forwards (through the wrappers when parameters are sharded: a sharded module's forward
        # gathers them)
        sharded = sharded_parameters(acc)
        policy = self.roles.policy if sharded else acc.unwrap_model(self.roles.policy)
        value_model = (
            self.roles.value_model if sharded or not self.roles.critic else acc.unwrap_model(self.roles.value_model)
        )
        mb = cfg.scoring_micro_batch_size()
        # a group's k responses share their prompt: run it once per micro-batch (not through a sharding wrapper)
        share, _ = cfg.prompt_sharing(sharded)
        logprobs, ref_logprobs, values, scores, score_std = [], [], [], [], []
        R = responses.shape[1]
        batches = self.scoring_batches(prompt_mask, response_mask, row_ids, mb, share)
        for batch in batches:
            idx = torch.tensor(batch, device=acc.device)
            # the forwards skip the columns every episode of the micro-batch pads; their outputs are padded back
            first, end = real_columns(attention_mask[idx], response_mask[idx], P)
            qr, am = query_responses[idx, first : P + end], attention_mask[idx, first : P + end]
            where = [f"prompt row {row_ids[j]} of {cfg.data.prompts.path}" for j in batch]
            groups = prompt_groups([row_ids[j] for j in batch], acc.device) if share else None
            batch_rows = [rows[j] for j in batch]
            # the policy and reference | the critic and reward models: side by side with train.concurrent_models
            (old, ref), (vals, mb_scores, mb_std) = self.roles.lanes.run(
                functools.partial(self.rollout_logprobs, policy, qr, am, P - first, groups),
                functools.partial(
                    self.rollout_values_and_scores, value_model, qr, am, P - first, batch_rows, where, groups
                ),
            )
            if old is not None:
                logprobs.append(F.pad(old, (0, R - end)))
            if ref is not None:
                ref_logprobs.append(F.pad(ref, (0, R - end)))
            values.append(
                F.pad(vals, (0, R - end)) if self.roles.critic else torch.zeros(qr.shape[0], R, device=qr.device)
            )
            scores.append(mb_scores)
            score_std.append(mb_std)
        # the micro-batches' outputs back in episode order
        where_from = torch.empty(len(prompts), dtype=torch.long, device=acc.device)
        where_from[torch.tensor([j for batch in batches for j in batch], device=acc.device)] = torch.arange(
            len(prompts), device=acc.device
        )

        def in_order(parts: list[torch.Tensor]) -> torch.Tensor | None:
            return torch.cat(parts)[where_from] if parts else None

        raw_scores = in_order(scores)
        ro = Rollout(
            query_responses,
            attention_mask,
            response_mask,
            P,
            in_order(logprobs),
            in_order(ref_logprobs),
            in_order(values),
            raw_scores.clone(),
            raw_scores,
            in_order(score_std),
            ended,
        )
        ro = self.all_episodes(ro)
        # N+ detail 3: a response cut by the length limit gets a fixed score instead of the RM's
        if cfg.rollout.missing_eos_penalty is not None:
            ro.scores = torch.where(ro.ended, ro.scores, torch.full_like(ro.scores, cfg.rollout.missing_eos_penalty))
        if cfg.reward.normalize:
            self.score_moments.update(ro.scores)
            ro.scores = (ro.scores - self.score_moments.mean) / math.sqrt(self.score_moments.var + 1e-8)
        if cfg.reward.clip:
            ro.scores = ro.scores.clamp(-cfg.reward.clip, cfg.reward.clip)
        t2 = time.time()
        return ro, {"time/generate": t1 - t0, "time/score": t2 - t1}

    @staticmethod
    def scoring_batches(prompt_mask, response_mask, row_ids: list, size: int, share: bool) -> list[list[int]]:
        """This process's episodes (positions) in scoring micro-batches of `size`, grouped by prompt and response
        length (`aligned_batches`; one host sync); with `share`, the episodes of a prompt count as its longest
        response and stay together, so its prompt runs once. One micro-batch in episode order when all fit."""
        n = len(row_ids)
        if size >= n:
            return [list(range(n))]
        lengths = torch.stack([prompt_mask.sum(1).to(response_mask.device), response_mask.sum(1)], 1).tolist()
        if share:
            longest: dict = {}
            for row, (_, r) in zip(row_ids, lengths):
                longest[row] = max(longest.get(row, 0), r)
            lengths = [(p, longest[row]) for row, (p, _) in zip(row_ids, lengths)]
        return aligned_batches([p for p, _ in lengths], [r for _, r in lengths], size)

    def rollout_logprobs(self, policy, query_responses, attention_mask, prompt_width: int, groups=None):
        """Old (the policy's; None when the update's forward gives them) and reference log-probs [B,R] (None
        without a reference) of a micro-batch of episodes [B,P+R]; `groups`: which episodes share a prompt
        (`shared_prompt`), None to run every sequence whole."""
        args = (query_responses, attention_mask, prompt_width, self.cfg.rollout.temperature)
        logprobs = logprobs_forward(groups)
        with self.accelerator.autocast():
            old = None if self.old_logprobs_from_update else logprobs(policy, *args)
            if self.cfg.models.reference == "none":
                return old, None
            if self.roles.reference is None:
                with self.accelerator.unwrap_model(self.roles.policy).disable_adapter():
                    return old, logprobs(policy, *args)
            return old, logprobs(self.roles.reference, *args)

    def rollout_values_and_scores(
        self, value_model, query_responses, attention_mask, prompt_width: int, rows, where, groups=None
    ):
        """Values [B,R] (None without a critic), scores [B] and the ensemble's std [B] of a micro-batch [B,P+R]."""
        values_of = values_forward(groups)
        with self.accelerator.autocast():
            values = None
            if self.roles.critic:
                values = values_of(value_model, query_responses, attention_mask, prompt_width)
            return values, *self.scorer.score(query_responses, attention_mask, prompt_width, rows, where, groups)

    def all_episodes(self, ro: Rollout) -> Rollout:
        """Every process's episodes on every process, in the iteration's global order (identity on one process).

        Responses are padded to the longest on any process. Holding the whole (small: token ids and per-token
        floats) rollout everywhere makes advantages, statistics and minibatches those of a single process.
        """
        acc = self.accelerator
        if acc.num_processes == 1:
            return ro
        world, local = acc.num_processes, ro.query_responses.shape[0]
        # gathered row r * local + k holds episode r + k * world
        order = torch.tensor([(i % world) * local + i // world for i in range(world * local)], device=acc.device)

        def everywhere(t: torch.Tensor, pad_value) -> torch.Tensor:
            dtype = t.dtype
            t = t.long() if dtype == torch.bool else t  # gloo cannot reduce bool tensors
            if t.dim() == 2:
                t = acc.pad_across_processes(t, dim=1, pad_index=pad_value)
            return acc.gather(t)[order].to(dtype)

        pad_id = self.tokenizer.pad_token_id
        return Rollout(
            everywhere(ro.query_responses, pad_id),
            everywhere(ro.attention_mask, 0),
            everywhere(ro.response_mask, 0),
            ro.prompt_width,
            *(None if t is None else everywhere(t, 0) for t in (ro.logprobs, ro.ref_logprobs)),
            everywhere(ro.values, 0),
            *(everywhere(t, 0) for t in (ro.scores, ro.raw_scores, ro.score_std, ro.ended)),
        )

    def advantages(self, ro: Rollout) -> dict:
        """3-4. Per-token rewards (KL-penalised unless the KL is a loss term), then the advantages of
        `ppo.advantage` over the whole iteration; returns its stats (the KL's: `kl_stats`, after the update)."""
        cfg, p = self.cfg, self.cfg.ppo
        mask = ro.response_mask
        beta_in_reward = self.kl_ctl.value if KL_PLACEMENTS[cfg.kl.placement].in_reward else 0.0
        logprobs, ref_logprobs = ro.logprobs, ro.ref_logprobs
        if logprobs is None or ref_logprobs is None:  # still to come from the update, or no reference: beta here is 0
            logprobs = ref_logprobs = torch.zeros_like(mask, dtype=torch.float32)
        ro.rewards, non_score_reward, _ = compute_rewards(
            ro.scores, logprobs, ref_logprobs, mask, beta_in_reward, cfg.kl.estimator
        )
        rewards = masked_whiten(ro.rewards, mask, shift_mean=False) if cfg.reward.whiten_rewards else ro.rewards
        values = torch.where(mask, ro.values, torch.zeros_like(ro.values))
        settings = AdvantageSettings(p.gamma, p.lam, cfg.rollout.samples_per_prompt, self.roles.critic)
        ro.advantages, ro.returns = ADVANTAGE_ESTIMATORS[p.advantage](rewards, values, mask, settings)
        # what shows reward hacking as it happens: diversity of the batch, and the reward models' disagreement
        content = ro.response_mask & (ro.query_responses[:, ro.prompt_width :] != self.tokenizer.eos_token_id)
        tokens = [r[m].tolist() for r, m in zip(ro.query_responses[:, ro.prompt_width :], content)]
        hacking = {"rollout/distinct1": distinct_n(tokens, 1), "rollout/distinct2": distinct_n(tokens, 2)}
        c = cfg.collapse
        hacking["rollout/repeat_share"] = repeat_share(tokens, c.max_ngram, c.repeat_times)
        if len(self.roles.reward_models) > 1:
            hacking["objective/ensemble_std"] = ro.score_std.mean()
        scores = ro.scores
        if self.roles.critic:
            hacking["val/explained_variance"] = explained_variance(ro.values, ro.returns, mask)
        return hacking | {
            "objective/scores": scores.mean(),
            "objective/scores_std": scores.std() if scores.numel() > 1 else scores.new_zeros(()),
            "objective/rm_score_raw": ro.raw_scores.mean(),
            "objective/non_score_reward": non_score_reward.sum(1).mean(),
            "objective/rlhf_reward": ro.rewards.sum(1).mean(),
            "objective/kl_coef": self.kl_ctl.value,
            "rollout/response_length": mask.sum(1).float().mean(),
            "rollout/eos_share": ro.ended.float().mean(),
        }

    def kl_stats(self, ro: Rollout) -> dict:
        """The rollout's KL to the reference (per sequence: k1 mean, k3 mean, the k1 mean's standard error) and
        the KL penalty's share of the return's spread, from its old log-probs (read after the update, which gives
        them when `old_logprobs_from_update`); none without a reference (models.reference: none)."""
        if ro.ref_logprobs is None:
            return {}
        mask = ro.response_mask
        k1 = (kl_penalty(ro.logprobs, ro.ref_logprobs, "k1") * mask).sum(1)
        k3 = (kl_penalty(ro.logprobs, ro.ref_logprobs, "k3") * mask).sum(1)
        return {
            "objective/kl": k1.mean(),
            "objective/kl_k3": k3.mean(),
            # the batch KL's standard error: how much of its iteration-to-iteration movement is sampling noise
            "objective/kl_stderr": k1.std() / math.sqrt(k1.numel()) if k1.numel() > 1 else k1.new_zeros(()),
            # the KL penalty's share of the return's spread (1 at the KL-regularised optimum): the anti-windup's gate
            "objective/kl_penalty_share": min(penalty_share(self.kl_ctl.value, k1, ro.scores), 1e6),
        }

    @torch.no_grad()
    def old_logprobs(self, ro: Rollout) -> torch.Tensor:
        """The policy's log-probs [B,R] of every episode of the rollout, in scoring micro-batches: the old log-probs
        of an iteration whose update was skipped (non-finite rewards) when the update was to give them."""
        sharded = sharded_parameters(self.accelerator)
        policy = self.roles.policy if sharded else self.accelerator.unwrap_model(self.roles.policy)
        out, mb = [], self.cfg.scoring_micro_batch_size()
        for s in range(0, ro.query_responses.shape[0], mb):
            part = ro.select(torch.arange(s, min(s + mb, ro.query_responses.shape[0]), device=ro.scores.device))
            with self.accelerator.autocast():
                lp = logprobs_forward(None)(
                    policy, part.query_responses, part.attention_mask, part.prompt_width, self.cfg.rollout.temperature
                )
            out.append(F.pad(lp, (0, ro.response_mask.shape[1] - lp.shape[1])))
        return torch.cat(out)
