"""The learner: PPO epochs over one `Rollout` — shuffled minibatches, micro-batches, the losses of the policy and
the critic, the pretraining-mix gradients, the optimizer steps — reading nothing but the rollout.

Each minibatch: POLICY_OBJECTIVES[ppo.objective] (L^CLIP or L^KLPEN) - ent_coef * H (+ beta * k3 KL with
kl.placement: loss) on the policy side, vf_coef * L^VF on the critic side, token means over the whole minibatch;
the gamma_ptx-weighted LM gradients of its pretraining sequences accumulate into the same buffers before the one
optimizer step (InstructGPT App. C.4). The policy and the critic share no parameter: each side runs its own
backward, gradient norm and step, side by side with train.concurrent_models.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from rlhf.algorithms import (
    KL_PLACEMENTS,
    POLICY_OBJECTIVES,
    KLPenaltyCoef,
    ObjectiveSettings,
    kl_penalty,
    lm_loss,
    masked_mean,
    value_loss,
)
from rlhf.config import PPOConfig
from rlhf.data.batching import aligned_batches, collate_lm
from rlhf.data.encoding import TruncationReport, encode_sft, encode_text
from rlhf.data.sources import load_source
from rlhf.models.forwards import causal_logits
from rlhf.models.shared_prompt import PromptGroups, logprobs_forward, prompt_groups, values_forward
from rlhf.runtime.accelerator import clip_grad_norm, sharded_parameters
from rlhf.runtime.guards import NonFiniteGuard
from rlhf.stages.ppo import settings
from rlhf.stages.ppo.roles import Roles
from rlhf.stages.ppo.rollout import Rollout


def _logged(key: str):
    """An `UpdateStats` field, logged under `key` (TRL's names) when the run has it (not None)."""
    return field(metadata={"key": key})


@dataclass(frozen=True, kw_only=True)
class UpdateStats:
    """One update's statistics: each minibatch statistic's mean over the update's minibatches (None for a term the
    run has not: no ptx, no critic, no KL loss term, an objective that adapts no beta), the epochs run and
    L^KLPEN's beta after the update."""

    policy_loss: float = _logged("loss/policy_avg")
    value_loss: float | None = _logged("loss/value_avg")
    entropy: float = _logged("policy/entropy_avg")
    approx_kl: float = _logged("policy/approxkl_avg")
    clipfrac: float = _logged("policy/clipfrac_avg")
    value_clipfrac: float | None = _logged("val/clipfrac_avg")
    ratio: float = _logged("policy/ratio_avg")
    ptx_loss: float | None = _logged("ptx/loss")
    grad_norm: float = _logged("policy/grad_norm")
    kl_old: float | None = _logged("policy/kl_old")  # L^KLPEN's d = KL(pi_old || pi)
    kl_loss: float | None = _logged("loss/kl_avg")
    epochs_done: int = _logged("policy/epochs_done")
    klpen_coef: float | None = _logged("policy/klpen_coef")

    def logged(self) -> dict[str, float]:
        """{logged name: value} of the statistics the run has, in the fields' order."""
        values = ((f.metadata["key"], getattr(self, f.name)) for f in fields(self))
        return {key: value for key, value in values if value is not None}


@dataclass(frozen=True)
class MinibatchStats:
    """One minibatch's statistics, token-weighted sums over its micro-batches and every process, named as logged.
    One tensor [len(NAMES)] so that each micro-batch adds its terms in one kernel, the two sides add and the
    processes reduce in one collective, and the update syncs with the host once."""

    sums: torch.Tensor
    NAMES: ClassVar[tuple[str, ...]] = tuple(
        f.metadata["key"] for f in fields(UpdateStats) if f.name not in ("epochs_done", "klpen_coef")
    )

    @classmethod
    def zeros(cls, device) -> MinibatchStats:
        return cls(torch.zeros(len(cls.NAMES), device=device))

    @classmethod
    def column(cls, name: str) -> int:
        return cls.NAMES.index(name)

    def add(self, terms: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
        """sums[name] += weight * value, for each term {name: scalar}."""
        cols = torch.tensor([self.column(name) for name in terms], device=self.sums.device)
        self.sums.index_add_(0, cols, torch.stack([v.detach().float() for v in terms.values()]) * weight)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.sums[self.column(name)]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.sums[self.column(name)] = value


def minibatch_order(batch_size: int, group_size: int, generator: torch.Generator) -> list[int]:
    """One epoch's shuffled order of the iteration's episodes, cut into minibatches by the caller. With
    group_size k > 1 (ppo.group_minibatches) whole groups are shuffled: episodes g*k .. g*k+k-1 (a prompt's k
    responses) stay consecutive."""
    if group_size == 1:
        return torch.randperm(batch_size, generator=generator).tolist()
    groups = torch.randperm(batch_size // group_size, generator=generator).tolist()
    return [g * group_size + j for g in groups for j in range(group_size)]


@dataclass(frozen=True)
class MinibatchPlan:
    """This process's part of a minibatch: its episodes (every num_processes-th) and ptx sequences, in
    micro-batches. Episodes of like prompt and response lengths share a micro-batch (`aligned_batches`: the fewest
    computed cells; the minibatch's gradient is the sum over its micro-batches whatever their make-up), or, with
    group_size k > 1, whole groups, each counted as its longest prompt and response; each micro-batch is cut to its
    own real columns once, for the policy and the critic side alike."""

    # (episodes: `Rollout.select`, share of the minibatch's response tokens, episodes sharing a prompt or None)
    micro: list[tuple[Rollout, torch.Tensor, PromptGroups | None]]
    episodes: list[torch.Tensor]  # each micro-batch's episodes: indices into the rollout
    ptx_micro: list[list[dict]]  # pretraining sequences, per ptx micro-batch
    ptx_tokens: int  # predicted ptx tokens of the whole minibatch (all processes), >= 1

    @classmethod
    def of(
        cls,
        ro: Rollout,
        minibatch: list[int],
        ptx: list[dict],
        rank: int,
        world: int,
        size: int,
        group_size: int = 1,
        share_prompt: bool = False,
    ):
        """`share_prompt`: mark the episodes of a micro-batch that share a prompt (a group: index // group_size)."""
        mine, ptx_mine = minibatch[rank::world], ptx[rank::world]
        if size < len(mine):  # one host sync: the prompt and response lengths of this process's episodes
            real = ro.attention_mask[mine, : ro.prompt_width].sum(1)
            lengths = torch.stack([real, ro.response_mask[mine].sum(1).to(real.dtype)], 1).tolist()
            if group_size > 1:  # a group counts as its longest prompt and response: its episodes tie, stay together
                longest: dict[int, list[int]] = {}
                for i, (p, r) in zip(mine, lengths):
                    g = longest.setdefault(i // group_size, [0, 0])
                    g[:] = max(g[0], p), max(g[1], r)
                lengths = [longest[i // group_size] for i in mine]
            batches = aligned_batches([p for p, _ in lengths], [r for _, r in lengths], size)
            mine = [mine[j] for batch in batches for j in batch]
        tokens = ro.response_mask[minibatch].sum().clamp(min=1)  # the whole minibatch's (all processes)
        device = ro.response_mask.device
        chunks = [mine[s : s + size] for s in range(0, len(mine), size)]
        episodes = [torch.tensor(chunk, device=device) for chunk in chunks]
        return cls(
            micro=[
                (
                    mb := ro.select(idx),
                    mb.response_mask.sum() / tokens,
                    prompt_groups([i // group_size for i in chunk], device) if share_prompt else None,
                )
                for chunk, idx in zip(chunks, episodes)
            ],
            episodes=episodes,
            ptx_micro=[ptx_mine[s : s + size] for s in range(0, len(ptx_mine), size)],
            ptx_tokens=max(sum(len(e["input_ids"]) - 1 for e in ptx), 1),
        )


def load_ptx(cfg: PPOConfig, tokenizer) -> list[dict]:
    """The pretraining mix (PPO-ptx): text, or whole conversations with the loss on every token."""
    if cfg.ptx.ptx_coef <= 0:
        return []
    fmt = cfg.data.format
    ds = load_source(cfg.ptx.data, cfg.ptx.kind, on_bad_row=fmt.on_bad_row)
    if cfg.ptx.kind == "text":
        return encode_text(tokenizer, ds["text"], cfg.ptx.max_length, TruncationReport())
    ptx_fmt = copy.deepcopy(fmt)  # whole conversations, loss on every token (the prompt is text to model too)
    ptx_fmt.max_length = cfg.ptx.max_length
    return encode_sft(tokenizer, ptx_fmt, ds, cfg.ptx.data.path, False, TruncationReport())


class Learner:
    """Runs `update(rollout, step)`: the PPO epochs, their optimizer steps, EMA and the non-finite guard."""

    def __init__(
        self,
        cfg: PPOConfig,
        acc,
        roles: Roles,
        ptx_examples: list[dict],
        *,
        kl_ctl,
        klpen: KLPenaltyCoef,
        guard: NonFiniteGuard,
    ):
        """`kl_ctl`: the beta of a KL loss term (kl.placement: loss); `klpen`: L^KLPEN's beta; `guard` skips an
        update with a non-finite loss or gradient norm."""
        self.cfg, self.accelerator, self.roles, self.ptx_examples = cfg, acc, roles, ptx_examples
        self.actor, self.critic = roles.actor, roles.critic
        self.kl_ctl, self.klpen, self.guard = kl_ctl, klpen, guard
        self._ptx_cached: tuple[int, list[int]] = (-1, [])  # (epoch, permutation) of the ptx text
        # ptx sequences per minibatch (all processes), a multiple of the process count so each takes as many
        world = acc.num_processes
        per_mini = cfg.ptx.sequences_per_episode * cfg.ppo.mini_batch_size / world
        self.ptx_per_mini = world * round(per_mini) if ptx_examples else 0
        # ppo.group_minibatches: whole groups per minibatch, each prompt's forward run once per micro-batch
        self.group_size = cfg.rollout.samples_per_prompt if cfg.ppo.group_minibatches else 1
        _, self.share_prompt = settings.prompt_sharing(cfg, sharded_parameters(acc))

    def ptx_batch(self, step: int, epoch: int, mini: int) -> list[dict]:
        """Every process's pretraining sequences for one minibatch: a deterministic walk over shuffled epochs."""
        n_mini = self.cfg.train.batch_size // self.cfg.ppo.mini_batch_size
        start = ((step * self.cfg.ppo.ppo_epochs + epoch) * n_mini + mini) * self.ptx_per_mini
        out, n = [], len(self.ptx_examples)
        for d in range(start, start + self.ptx_per_mini):
            e, i = divmod(d, n)
            out.append(self.ptx_examples[self._ptx_perm(e)[i]])
        return out

    def _ptx_perm(self, epoch: int) -> list[int]:
        if self._ptx_cached[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            self._ptx_cached = (epoch, torch.randperm(len(self.ptx_examples), generator=g).tolist())
        return self._ptx_cached[1]

    def update(self, ro: Rollout, step: int) -> UpdateStats:
        """5. ppo_epochs over shuffled minibatches of the iteration's episodes; each process takes every
        num_processes-th episode of a minibatch, so the minibatches are those of one process. A rollout without
        old log-probs (`settings.old_logprobs_from_update`: one optimizer step) gets its forward's, detached, as
        them: the ratio is exactly 1, and ro.logprobs is filled for the KL statistics."""
        self.actor.policy.train()
        if self.critic is not None:
            self.critic.value_model.train()
        # the update's own log-probs as the old ones: each process fills its episodes' rows, the sum has them all
        fresh_logprobs = torch.zeros_like(ro.response_mask, dtype=torch.float32) if ro.logprobs is None else None
        per_minibatch, epochs_done = self._epochs(ro, step, fresh_logprobs)
        if fresh_logprobs is not None:
            n = self.accelerator.num_processes
            ro.logprobs = self.accelerator.reduce(fresh_logprobs, "sum") if n > 1 else fresh_logprobs
        return self._summary(torch.stack([stats.sums for stats in per_minibatch]), epochs_done)

    def _epochs(self, ro: Rollout, step: int, fresh_logprobs) -> tuple[list[MinibatchStats], int]:
        """The epochs' minibatch steps -> (each minibatch's statistics, the epochs run): an epoch stops early
        when a minibatch's approx-KL passes ppo.target_approx_kl (the same on every process), and so does the
        update."""
        cfg, p = self.cfg, self.cfg.ppo
        g = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
        n_mini = cfg.train.batch_size // p.mini_batch_size
        per_minibatch: list[MinibatchStats] = []
        for epoch in range(p.ppo_epochs):
            order = minibatch_order(cfg.train.batch_size, self.group_size, g)
            for mini in range(n_mini):
                minibatch = order[mini * p.mini_batch_size : (mini + 1) * p.mini_batch_size]
                ptx = self.ptx_batch(step, epoch, mini) if self.ptx_per_mini else []
                stats = self.minibatch_step(ro, minibatch, ptx, step, fresh_logprobs)
                per_minibatch.append(stats)
                if p.target_approx_kl and stats["policy/approxkl_avg"] > p.target_approx_kl:
                    return per_minibatch, epoch
        return per_minibatch, p.ppo_epochs

    def _summary(self, per_minibatch: torch.Tensor, epochs_done: int) -> UpdateStats:
        """The update's statistics from its minibatches' [n, len(MinibatchStats.NAMES)]; L^KLPEN's beta adapts."""
        cfg, p = self.cfg, self.cfg.ppo
        means = dict(zip(MinibatchStats.NAMES, per_minibatch.mean(0).tolist()))  # one host sync
        if not self.ptx_per_mini:
            means["ptx/loss"] = None
        if self.critic is None:
            means["loss/value_avg"] = means["val/clipfrac_avg"] = None
        if not KL_PLACEMENTS[cfg.kl.placement].loss_estimator or cfg.models.reference == "none":
            means["loss/kl_avg"] = None
        klpen_coef = None
        if POLICY_OBJECTIVES[p.objective].adapts_beta:
            # [PPO] sec. 4: d = KL(pi_old || pi) after the update (here: over the last epoch's minibatches) sets beta
            n_mini = cfg.train.batch_size // p.mini_batch_size
            last_epoch = per_minibatch[-n_mini:, MinibatchStats.column("policy/kl_old")]
            self.klpen.update(float(last_epoch.mean()))
            klpen_coef = self.klpen.value
        else:
            means["policy/kl_old"] = None
        named = {f.name: means[f.metadata["key"]] for f in fields(UpdateStats) if f.metadata["key"] in means}
        return UpdateStats(**named, epochs_done=epochs_done, klpen_coef=klpen_coef)

    def minibatch_step(
        self, ro: Rollout, minibatch: list[int], ptx: list[dict], step: int, fresh_logprobs=None
    ) -> MinibatchStats:
        """One optimizer step on a minibatch of episodes (indices into the rollout) and its ptx sequences.

        The loss is the token mean over the whole minibatch of the policy objective (-L^CLIP, or -L^KLPEN), plus
        vf_coef * L^VF with a critic, minus ent_coef * H, plus kl_coef * KL(pi || pi_ref) when the KL is a loss
        term (kl.placement: loss), plus ptx_coef times the token-mean LM loss of the ptx sequences: gradients of all
        accumulate over micro-batches into the same buffers before the one step. The policy and the critic share no
        parameter, so each side runs its own backward (the gradients of the summed loss), side by side with
        `train.concurrent_models`. Each process takes every num_processes-th episode (and ptx sequence); its
        micro-batch losses are weighted by their share of the minibatch's tokens times num_processes, so DDP's
        gradient average is the one-process gradient whatever the micro-batching. Returns the minibatch's
        statistics, token-weighted over every process. `fresh_logprobs` [B,R]: a rollout
        without old log-probs takes the forward's, detached, as them and gets them written into these rows.
        """
        acc = self.accelerator
        plan = MinibatchPlan.of(
            ro,
            minibatch,
            ptx,
            acc.process_index,
            acc.num_processes,
            self.cfg.ppo.micro_batch_size,
            self.group_size,
            self.share_prompt,
        )
        if self.critic is not None:
            sides = self.roles.lanes.run(
                lambda: self._policy_side(plan, fresh_logprobs), lambda: self._value_side(plan)
            )
        else:
            sides = [self._policy_side(plan, fresh_logprobs)]
        sums = sum(side_stats.sums for side_stats, _ in sides)
        if acc.num_processes > 1:  # every process's share: the statistics of the whole minibatch, identical everywhere
            sums = acc.reduce(sums, "sum")
        stats = MinibatchStats(sums)
        stats["policy/grad_norm"] = sides[0][1]
        numbers = {k: stats[k] for k in ("loss/policy_avg", "loss/value_avg", "ptx/loss", "policy/grad_norm")}
        if self.critic is not None:
            numbers["value/grad_norm"] = sides[1][1]
        self._optimizer_steps(skip=self.guard.skip(acc, step, numbers))
        return stats

    def _policy_side(self, plan: MinibatchPlan, fresh_logprobs=None) -> tuple[MinibatchStats, torch.Tensor]:
        """The policy's backwards (PPO micro-batches, then ptx ones) -> (statistics, clipped gradient norm)."""
        stats = MinibatchStats.zeros(self.accelerator.device)
        n_backward = len(plan.micro) + len(plan.ptx_micro)
        for k, ((mb, share, groups), episodes) in enumerate(zip(plan.micro, plan.episodes), 1):
            with self._no_sync(self.actor.policy, k < n_backward), self.accelerator.autocast():
                terms, logprobs = self._policy_micro_batch(mb, share, groups)
            if fresh_logprobs is not None:
                fresh_logprobs[episodes, : logprobs.shape[1]] = logprobs.to(fresh_logprobs.dtype)
            stats.add(terms, share)
        for k, examples in enumerate(plan.ptx_micro, len(plan.micro) + 1):
            with self._no_sync(self.actor.policy, k < n_backward), self.accelerator.autocast():
                ptx_loss = self._ptx_micro_batch(plan, examples)
            stats["ptx/loss"] += ptx_loss.detach().float()
        return stats, clip_grad_norm(
            self.accelerator, list(self.actor.policy.parameters()), self.cfg.optim.max_grad_norm
        )

    def _policy_micro_batch(self, mb: Rollout, share: torch.Tensor, groups: PromptGroups | None):
        """Backward of one micro-batch's policy loss (episodes `mb`, `share` of the minibatch's tokens; `groups`:
        episodes whose prompt runs once) -> (its statistics {name: scalar}, its log-probs [b,r] detached). Without
        old log-probs (`mb.logprobs` None) the forward's own, detached, are the old ones."""
        p, world = self.cfg.ppo, self.accelerator.num_processes
        objective = POLICY_OBJECTIVES[p.objective]
        kl_loss = KL_PLACEMENTS[self.cfg.kl.placement].loss_estimator
        mask = mb.response_mask
        terms: dict[str, torch.Tensor] = {}
        # the entropy is differentiated only when in the loss (a softmax backward over the vocabulary)
        new_logprobs, entropy = logprobs_forward(groups)(
            self.actor.policy_train,
            mb.query_responses,
            mb.attention_mask,
            mb.prompt_width,
            self.cfg.rollout.temperature,
            entropy=True,
            entropy_grad=p.ent_coef != 0,
        )
        objective_settings = ObjectiveSettings(p.cliprange, self.klpen.value)
        old_logprobs = new_logprobs.detach() if mb.logprobs is None else mb.logprobs
        pg_loss, pg_stats = objective.loss(new_logprobs, old_logprobs, mb.advantages, mask, objective_settings)
        if objective.adapts_beta:
            terms["policy/kl_old"] = pg_stats["kl_old"]
        ent = masked_mean(entropy, mask)
        loss = pg_loss - p.ent_coef * ent
        if kl_loss and mb.ref_logprobs is not None:  # GRPO: beta * k3 KL(pi || pi_ref), differentiated
            kl_term = masked_mean(kl_penalty(new_logprobs, mb.ref_logprobs, kl_loss), mask)
            loss = loss + self.kl_ctl.value * kl_term
            terms["loss/kl_avg"] = kl_term
        self.accelerator.backward(loss * share * world)
        terms |= {
            "loss/policy_avg": pg_loss,
            "policy/entropy_avg": ent,
            "policy/approxkl_avg": pg_stats["approx_kl"],
            "policy/clipfrac_avg": pg_stats["clipfrac"],
            "policy/ratio_avg": pg_stats["ratio_mean"],
        }
        return terms, new_logprobs.detach()

    def _ptx_micro_batch(self, plan: MinibatchPlan, examples: list[dict]) -> torch.Tensor:
        """Backward of gamma_ptx * the pretraining sequences' LM loss (a share of the minibatch's ptx tokens)."""
        acc = self.accelerator
        batch = {key: v.to(acc.device) for key, v in collate_lm(examples, self.roles.tokenizer.pad_token_id).items()}
        logits = causal_logits(self.actor.policy_train, batch["input_ids"], batch["attention_mask"])
        ptx_loss = lm_loss(logits, batch["labels"], reduction="sum") / plan.ptx_tokens
        # gradients of gamma_ptx * E[-log pi(x)] accumulate into the PPO minibatch's buffers
        acc.backward(self.cfg.ptx.ptx_coef * ptx_loss * acc.num_processes)
        return ptx_loss

    def _value_side(self, plan: MinibatchPlan) -> tuple[MinibatchStats, torch.Tensor]:
        """The critic's backwards (one per PPO micro-batch) -> (statistics, clipped gradient norm)."""
        acc, p, critic = self.accelerator, self.cfg.ppo, self.critic
        stats = MinibatchStats.zeros(acc.device)
        for k, (mb, share, groups) in enumerate(plan.micro, 1):  # the critic's last backward: the last micro-batch's
            with self._no_sync(critic.value_model, k < len(plan.micro)), acc.autocast():
                vpred = values_forward(groups)(
                    critic.value_train, mb.query_responses, mb.attention_mask, mb.prompt_width
                )
                vf_loss, vf_stats = value_loss(
                    vpred, mb.values, mb.returns, mb.response_mask, p.cliprange_value or None
                )
                acc.backward(p.vf_coef * vf_loss * share * acc.num_processes)
            stats.add({"loss/value_avg": vf_loss, "val/clipfrac_avg": vf_stats["vf_clipfrac"]}, share)
        return stats, clip_grad_norm(acc, list(critic.value_model.parameters()), self.cfg.optim.max_grad_norm)

    def _optimizer_steps(self, skip: bool) -> None:
        """Step (unless the non-finite guard skips the update) and schedule each side, then the policy's EMA."""
        steps = [(self.actor.optimizer, self.actor.scheduler)]
        if self.critic is not None:
            steps.append((self.critic.optimizer, self.critic.scheduler))

        def optimizer_step(opt, sched) -> None:
            if not skip:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

        self.roles.lanes.run(*(functools.partial(optimizer_step, opt, sched) for opt, sched in steps))
        if self.actor.ema is not None:
            self.actor.ema.update(self.accelerator.unwrap_model(self.actor.policy))

    def _no_sync(self, model, skip: bool) -> contextlib.AbstractContextManager:
        """DDP: skip a model's gradient all-reduce on all but its last backward of the step (each must sync once)."""
        return self.accelerator.no_sync(model) if skip else contextlib.nullcontext()
