"""The experience maker: an iteration's prompts in, a finished `Rollout` out.

    make(step)        1. sample: this process's share of the episodes (`ResponseGenerator`) -> `Samples`
                      2. score: old and reference log-probs, values, reward-model / function scores, in
                         micro-batches -> this process's `Rollout`; gather every process's episodes
                         (`gather_episodes`); shape the scores (missing-EOS penalty, normalisation, clipping)
    advantages(ro)    3. r_t = -beta * KL_t (+ the score at the last token), kl.placement: loss leaves the KL out
                      4. ADVANTAGE_ESTIMATORS[ppo.advantage]; the iteration's statistics (scores, collapse signs)
    kl_stats(ro)      the rollout's KL to the reference, read after the update (which may give the old log-probs)

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
from rlhf.data.batching import BatchSchedule, aligned_batches, pad
from rlhf.data.encoding import TruncationReport, encode_prompts
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
from rlhf.stages.ppo import settings
from rlhf.stages.ppo.roles import Roles
from rlhf.stages.ppo.rollout import ROLLOUT_STREAM, Rollout, gather_episodes, real_columns
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
    ids = encode_prompts(tokenizer, fmt, rows, report, source=cfg.data.prompts.path)
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
        prompts.eval_ids = encode_prompts(tokenizer, fmt, prompts.eval_rows, source=cfg.data.eval_prompts.path)
    return prompts


@dataclass(kw_only=True)
class Samples:
    """This process's episodes of an iteration as sampled: sequences [b, P+R] (prompts left-padded to the
    iteration's widest prompt P), masks, and the prompt row each one answers."""

    query_responses: torch.Tensor  # [b, P+R]
    attention_mask: torch.Tensor  # [b, P+R]
    prompt_mask: torch.Tensor  # [b, P], on the host
    response_mask: torch.Tensor  # [b, R] bool
    ended: torch.Tensor  # [b] whether the response ended with EOS
    row_ids: list[int]  # prompt row of each episode
    rows: list[dict]  # those rows

    @property
    def prompt_width(self) -> int:
        return self.prompt_mask.shape[1]


class ExperienceMaker:
    """Turns an iteration's prompts into a scored `Rollout` with rewards and advantages (see the module doc).

    Reads the KL controller's beta and updates the score normaliser's moments; holds no other state."""

    def __init__(self, cfg: PPOConfig, acc, roles: Roles, prompts: Prompts, kl_ctl, score_moments: RunningMoments):
        self.cfg, self.accelerator, self.roles, self.prompts = cfg, acc, roles, prompts
        self.kl_ctl, self.score_moments = kl_ctl, score_moments
        self.tokenizer = roles.tokenizer
        self.scorer = Scorer(cfg, roles.tokenizer, roles.rewards)
        # one optimizer step per rollout with the KL out of the reward: the update's forward gives the old log-probs
        self.old_logprobs_from_update = settings.old_logprobs_from_update(cfg)
        # a group's prompt is prefilled once for its k samples as it is scored once (rollout.share_prompt)
        share, _ = settings.prompt_sharing(cfg, sharded_parameters(acc))
        self.generator = HFGenerator(
            acc, roles.actor.policy, roles.tokenizer, cfg.rollout, prefill=shared_prefill if share else None
        )

    def episode_rows(self, step: int) -> list[int]:
        """Prompt row of each of iteration `step`'s episodes, in the global order (a pure function of the step);
        the rollout.samples_per_prompt responses to a prompt are consecutive episodes (a group)."""
        k = self.cfg.rollout.samples_per_prompt
        return [row for row in self.prompts.schedule(step) for _ in range(k)]

    @torch.no_grad()
    def make(self, step: int) -> tuple[Rollout, dict]:
        """1-2. Every process's episodes of iteration `step`, scored, as one `Rollout` (rewards and advantages
        still to come: `advantages`), and the phases' timings. This process samples and scores its share."""
        t0 = time.time()
        samples = self.sample(step)
        t1 = time.time()
        ro = gather_episodes(self.accelerator, self.score(samples), self.tokenizer.pad_token_id)
        ro = self.shape_scores(ro)
        t2 = time.time()
        return ro, {"time/generate": t1 - t0, "time/score": t2 - t1}

    def sample(self, step: int) -> Samples:
        """1. This process's share of iteration `step`'s episodes, sampled.

        Episode i of the iteration is sampled on process i % num_processes with its own random stream (seeded by
        run seed, iteration and i) and prompts are left-padded to the widest prompt of the whole iteration, so the
        gathered rollout is the one a single process would sample (up to float rounding in the forwards).
        """
        cfg, acc, tok = self.cfg, self.accelerator, self.tokenizer
        episodes = self.episode_rows(step)
        positions = list(range(acc.process_index, len(episodes), acc.num_processes))
        row_ids = [episodes[i] for i in positions]
        prompts = [self.prompts.ids[j] for j in row_ids]
        seeds = [episode_seed(cfg.seed, ROLLOUT_STREAM, step, i) for i in positions]
        # one left-padded prompt tensor so every chunk shares the prompt width P
        P = max(len(self.prompts.ids[j]) for j in episodes)
        prompt_ids = pad(prompts, tok.pad_token_id, side="left", width=P)
        prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left", width=P)
        responses = self.generator.generate(prompts, seeds)
        responses, response_mask = truncate_after_eos(responses, tok.eos_token_id, tok.pad_token_id)
        return Samples(
            query_responses=torch.cat([prompt_ids.to(acc.device), responses], 1),
            attention_mask=torch.cat([prompt_mask.to(acc.device), response_mask.long()], 1),
            prompt_mask=prompt_mask,
            response_mask=response_mask,
            ended=(responses == tok.eos_token_id).any(-1),
            row_ids=row_ids,
            rows=[self.prompts.rows[j] for j in row_ids],
        )

    def score(self, s: Samples) -> Rollout:
        """2. This process's episodes scored in micro-batches (`scoring_batches`), back in episode order: its
        `Rollout`, with `scores` still the raw scores (`shape_scores` follows the gathering)."""
        acc = self.accelerator
        # a group's k responses share their prompt: it runs once per micro-batch (not through a sharding wrapper)
        share, _ = settings.prompt_sharing(self.cfg, sharded_parameters(acc))
        mb, models = settings.scoring_micro_batch_size(self.cfg), self._scoring_models()
        batches = self.scoring_batches(s.prompt_mask, s.response_mask, s.row_ids, mb, share)
        parts = [self.score_micro_batch(s, batch, models, share) for batch in batches]
        # the micro-batches' outputs back in episode order
        n, scored = len(s.row_ids), [j for batch in batches for j in batch]
        where_from = torch.empty(n, dtype=torch.long, device=acc.device)
        where_from[torch.tensor(scored, device=acc.device)] = torch.arange(n, device=acc.device)

        def in_order(column: tuple[torch.Tensor | None, ...]) -> torch.Tensor | None:
            kept = [t for t in column if t is not None]
            return torch.cat(kept)[where_from] if kept else None

        logprobs, ref_logprobs, values, raw_scores, score_std = (in_order(column) for column in zip(*parts))
        return Rollout(
            query_responses=s.query_responses,
            attention_mask=s.attention_mask,
            response_mask=s.response_mask,
            prompt_width=s.prompt_width,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            scores=raw_scores.clone(),
            raw_scores=raw_scores,
            score_std=score_std,
            ended=s.ended,
        )

    def score_micro_batch(self, s: Samples, batch: list[int], models: tuple, share: bool) -> tuple:
        """(old log-probs, reference log-probs, values, scores, the ensemble's std) of the episodes `batch`
        (positions in `s`): per token [b, R] (log-probs None where there are none), per episode [b]. The forwards
        skip the columns every episode of the micro-batch pads; their outputs are padded back to R."""
        acc, P, R = self.accelerator, s.prompt_width, s.response_mask.shape[1]
        idx = torch.tensor(batch, device=acc.device)
        first, end = real_columns(s.attention_mask[idx], s.response_mask[idx], P)
        qr, am = s.query_responses[idx, first : P + end], s.attention_mask[idx, first : P + end]
        where = [f"prompt row {s.row_ids[j]} of {self.cfg.data.prompts.path}" for j in batch]
        groups = prompt_groups([s.row_ids[j] for j in batch], acc.device) if share else None
        rows = [s.rows[j] for j in batch]
        policy, value_model = models
        # the policy and reference | the critic and reward models: side by side with train.concurrent_models
        (old, ref), (values, scores, score_std) = self.roles.lanes.run(
            functools.partial(self.rollout_logprobs, policy, qr, am, P - first, groups),
            functools.partial(self.rollout_values_and_scores, value_model, qr, am, P - first, rows, where, groups),
        )

        def padded(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else F.pad(t, (0, R - end))

        old, ref = padded(old), padded(ref)
        values = padded(values) if self.roles.critic is not None else torch.zeros(qr.shape[0], R, device=qr.device)
        return old, ref, values, scores, score_std

    def _scoring_models(self) -> tuple:
        """(policy, value model or None) as the scoring forwards call them: unwrapped, or through the wrappers when
        parameters are sharded (a sharded module's forward gathers them)."""
        acc, policy = self.accelerator, self.roles.actor.policy
        value_model = None if self.roles.critic is None else self.roles.critic.value_model
        if sharded_parameters(acc):
            return policy, value_model
        return acc.unwrap_model(policy), None if value_model is None else acc.unwrap_model(value_model)

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
            if self.roles.actor.reference is None:
                with self.accelerator.unwrap_model(self.roles.actor.policy).disable_adapter():
                    return old, logprobs(policy, *args)
            return old, logprobs(self.roles.actor.reference, *args)

    def rollout_values_and_scores(
        self, value_model, query_responses, attention_mask, prompt_width: int, rows, where, groups=None
    ):
        """Values [B,R] (None without a critic), scores [B] and the ensemble's std [B] of a micro-batch [B,P+R]."""
        values_of = values_forward(groups)
        with self.accelerator.autocast():
            values = None
            if self.roles.critic is not None:
                values = values_of(value_model, query_responses, attention_mask, prompt_width)
            return values, *self.scorer.score(query_responses, attention_mask, prompt_width, rows, where, groups)

    def shape_scores(self, ro: Rollout) -> Rollout:
        """The iteration's `scores` from its raw scores: the missing-EOS penalty, then the optional normalisation
        (running moments of every iteration's scores) and clipping."""
        cfg = self.cfg
        # N+ detail 3: a response cut by the length limit gets a fixed score instead of the RM's
        if cfg.rollout.missing_eos_penalty is not None:
            ro.scores = torch.where(ro.ended, ro.scores, torch.full_like(ro.scores, cfg.rollout.missing_eos_penalty))
        if cfg.reward.normalize:
            self.score_moments.update(ro.scores)
            ro.scores = (ro.scores - self.score_moments.mean) / math.sqrt(self.score_moments.var + 1e-8)
        if cfg.reward.clip:
            ro.scores = ro.scores.clamp(-cfg.reward.clip, cfg.reward.clip)
        return ro

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
        critic = self.roles.critic is not None
        estimator = AdvantageSettings(p.gamma, p.lam, cfg.rollout.samples_per_prompt, critic)
        ro.advantages, ro.returns = ADVANTAGE_ESTIMATORS[p.advantage](rewards, values, mask, estimator)
        # what shows reward hacking as it happens: diversity of the batch, and the reward models' disagreement
        content = ro.response_mask & (ro.query_responses[:, ro.prompt_width :] != self.tokenizer.eos_token_id)
        tokens = [r[m].tolist() for r, m in zip(ro.query_responses[:, ro.prompt_width :], content)]
        hacking = {"rollout/distinct1": distinct_n(tokens, 1), "rollout/distinct2": distinct_n(tokens, 2)}
        c = cfg.collapse
        hacking["rollout/repeat_share"] = repeat_share(tokens, c.max_ngram, c.repeat_times)
        if len(self.roles.rewards.models) > 1:
            hacking["objective/ensemble_std"] = ro.score_std.mean()
        scores = ro.scores
        if critic:
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
        policy, _ = self._scoring_models()
        out, mb = [], settings.scoring_micro_batch_size(self.cfg)
        for s in range(0, ro.query_responses.shape[0], mb):
            part = ro.select(torch.arange(s, min(s + mb, ro.query_responses.shape[0]), device=ro.scores.device))
            with self.accelerator.autocast():
                lp = logprobs_forward(None)(
                    policy, part.query_responses, part.attention_mask, part.prompt_width, self.cfg.rollout.temperature
                )
            out.append(F.pad(lp, (0, ro.response_mask.shape[1] - lp.shape[1])))
        return torch.cat(out)
