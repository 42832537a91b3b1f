"""The PPO loop: owns the run — set-up, resume, the iterations, KL control and stop rules, logging, evaluation,
checkpoints and final/. Each iteration is `ExperienceMaker.make` + `.advantages` (rlhf.stages.ppo.experience), then
`Learner.update` (rlhf.stages.ppo.learner); the models are `Roles` (rlhf.stages.ppo.roles), built once by
`load_roles`.

Stage 3: PPO against the reward model with a per-token KL penalty to SFT and the pretraining mix (PPO-ptx).

Four roles: the policy (from SFT, trained), the frozen reference (SFT weights: a second copy, or the LoRA policy
with its adapter disabled), the value model (from the reward model, as InstructGPT does; trained) and the frozen
reward model (or a reward function, or both). Dropout is off in all of them. One iteration:

  1. rollout   sample rollout.samples_per_prompt responses per prompt from the policy's own distribution (left-
               padded prompts, KV cache, stop at EOS); each episode from its own seeded random stream
  2. score     RM score at the EOS token (an ensemble: mean, mean - lambda*std or min of its members) and/or
               reward.function; old log-probs, reference log-probs, values (one forward each; the old
               log-probs are the update's own forward when it is one optimizer step with the KL out of the
               reward); then every process's episodes are gathered on every process
  3. rewards   r_t = -beta * KL_t, plus the score at the last response token (missing-EOS penalty optional); with
               kl.placement: loss the KL leaves the reward and becomes a loss term (GRPO)
  4. advantages  ppo.advantage: GAE with the value model (default; whitened), REINFORCE with a learned or batch-mean
               baseline, or the critic-free RLOO / GRPO from each prompt's group (docs/algorithms.md)
  5. update    ppo_epochs over shuffled minibatches: -L^CLIP (or -L^KLPEN, adaptive beta) + vf_coef * L^VF (with a
               critic) - ent_coef * H, token means over the minibatch; for each minibatch the gamma_ptx-weighted
               pretraining LM gradients accumulate into the same buffers before the one optimizer step
               (InstructGPT App. C.4; not DeepSpeed-Chat's separate step)
  6. log (with the signs of reward hacking: length, EOS share, distinct-n, repeats, ensemble std) / KL controller
     (fixed beta, or rlhf.algorithms.kl_control's toward kl.target) / KL budget and collapse guard (hard stops) / EMA /
     checkpoint

N processes compute the 1-process iteration: episode i is sampled on process i mod N, the rollout is gathered, and
each process takes every N-th episode of the same minibatches (docs/scaling.md). SIGTERM/SIGINT end the iteration
with a checkpoint; NaN/inf rewards, advantages, losses or gradient norms skip the update or stop the run
(rlhf.runtime.guards, docs/reliability.md).

Departures from the paper: `value_init: policy` starts a separate value network from the SFT weights rather
than putting a value head on the policy trunk.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from accelerate import DistributedType

from rlhf.algorithms import KLPenaltyCoef
from rlhf.algorithms.collapse import CollapseMonitor
from rlhf.algorithms.kl_control import KLBudget, build_kl_controller
from rlhf.config import ConfigError, PPOConfig, check_paths, save_config
from rlhf.generation.sampling import decode_responses
from rlhf.runtime.accelerator import sharded_parameters, stage_accelerator
from rlhf.runtime.checkpoints import Progress, final_model, publish_final, resume_state, save_checkpoint, save_final
from rlhf.runtime.guards import GracefulStop, NonFiniteGuard, checkpoint_or_stop
from rlhf.runtime.optim import split_batch
from rlhf.runtime.seeds import seed_everything
from rlhf.runtime.tracking import ProgressBar, drop_metrics_after, finish_trackers, log_metrics, log_text
from rlhf.stages.ppo.experience import ExperienceMaker, load_prompts
from rlhf.stages.ppo.learner import Learner, load_ptx
from rlhf.stages.ppo.roles import load_roles, load_tokenizers
from rlhf.stages.ppo.rollout import Rollout
from rlhf.stages.ppo.scoring import held_out_scores
from rlhf.stages.ppo.state import RunningMoments, StopRules


class PPOTrainer:
    """Builds the run (roles, data, state) and runs it: `train()`."""

    def __init__(self, cfg: PPOConfig, source: str = "<config>"):
        check_paths(cfg, source)
        self.cfg = cfg
        acc = self.accelerator = stage_accelerator(cfg)
        seed_everything(cfg.seed)
        tokenizers = load_tokenizers(cfg)
        if cfg.ema.decay and sharded_parameters(acc) and acc.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError(
                "ema.decay > 0 with DeepSpeed ZeRO-3: its partitioned parameters are not addressable by name, so the "
                "EMA cannot follow them; set ema.decay: 0, or use FSDP2 or ZeRO-1/2"
            )
        # every process samples the same number of episodes and takes the same share of each minibatch
        split_batch(cfg.train.batch_size, 1, acc.num_processes, "train.batch_size")
        split_batch(cfg.ppo.mini_batch_size, cfg.ppo.micro_batch_size, acc.num_processes, "ppo.mini_batch_size")
        self.prompts = load_prompts(cfg, tokenizers.policy)
        ptx_examples = load_ptx(cfg, tokenizers.policy)
        self.total_steps = cfg.train.max_steps or max(
            1, math.ceil(cfg.train.epochs * self.prompts.schedule.steps_per_epoch)
        )
        self.roles = load_roles(cfg, acc, tokenizers, self.total_steps)

        self.kl_ctl = build_kl_controller(cfg.kl)
        self.kl_budget = KLBudget(cfg.kl.budget, cfg.kl.budget_window)
        self.klpen = KLPenaltyCoef(cfg.ppo.klpen_coef, cfg.ppo.klpen_target)  # L^KLPEN's beta (objective: klpen)
        self.score_moments = RunningMoments()
        self.progress = Progress()
        self.ema = self.roles.actor.ema
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_skips, "ppo")
        self.collapse = CollapseMonitor(cfg.collapse, cfg.collapse.window)
        # accelerate numbers custom states by position: the two stop rules share one, so a checkpoint without a
        # collapse monitor still loads
        stop_rules = StopRules(self.kl_budget, self.collapse)
        acc.register_for_checkpointing(
            self.progress, self.kl_ctl, self.score_moments, stop_rules, self.guard, self.klpen
        )
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)
        self.experience = ExperienceMaker(cfg, acc, self.roles, self.prompts, self.kl_ctl, self.score_moments)
        self.learner = Learner(
            cfg, acc, self.roles, ptx_examples, kl_ctl=self.kl_ctl, klpen=self.klpen, guard=self.guard
        )

    # the models and the steps of an iteration as the trainer's own surface (tests and tools call them)
    @property
    def policy(self) -> torch.nn.Module:
        return self.roles.actor.policy

    @property
    def policy_train(self) -> torch.nn.Module:
        return self.roles.actor.policy_train

    @property
    def reference(self) -> torch.nn.Module | None:
        return self.roles.actor.reference

    @property
    def value_model(self) -> torch.nn.Module | None:
        return None if self.roles.critic is None else self.roles.critic.value_model

    @property
    def reward_models(self) -> list[torch.nn.Module]:
        return self.roles.rewards.models

    @property
    def lanes(self):
        return self.roles.lanes

    @property
    def prompt_rows(self) -> list[dict]:
        return self.prompts.rows

    def episode_rows(self, step: int) -> list[int]:
        return self.experience.episode_rows(step)

    def rollout(self, step: int) -> tuple[Rollout, dict]:
        return self.experience.make(step)

    def score(self, query_responses, attention_mask, prompt_width: int, rows: list[dict], where: list[str]):
        return self.experience.scorer.score(query_responses, attention_mask, prompt_width, rows, where)

    def compute_advantages(self, ro: Rollout) -> dict:
        return self.experience.advantages(ro)

    def train(self) -> Path:
        """The run: resume, then iterations until the last (or a hard stop / a signal), checkpoints, final/."""
        cfg, acc = self.cfg, self.accelerator
        out = Path(cfg.output_dir)
        self._start(out)
        bar = ProgressBar(self.total_steps, "ppo", cfg.logging.progress, self.progress.step, acc.is_main_process)
        with GracefulStop() as stop:
            while self.progress.step < self.total_steps and not (self.kl_budget.exceeded or self.collapse.stopped):
                ro, stats, stop_reason = self.iteration(self.progress.step)
                shown = {"score": float(stats["objective/scores"])}
                if "objective/kl" in stats:  # not without a reference
                    shown["kl"] = float(stats["objective/kl"])
                bar.update(1, **shown)
                step = self.progress.step
                if step % cfg.logging.every == 0 or step == self.total_steps or stop_reason:
                    log_metrics(acc, stats, step)
                    self.log_samples(ro, step)
                if stop_reason:
                    # a hard stop: the policy as it is now becomes final/ (and a checkpoint, for the frontier)
                    acc.print(f"[ppo] stopping at iteration {step}: {stop_reason}")
                    self.save(step)
                    break
                if self.prompts.eval_ids and (
                    (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == self.total_steps
                ):
                    log_metrics(acc, self.evaluate(), step)
                checkpoint_or_stop(acc, stop, bar, step, self.total_steps, cfg.checkpoint.every, self.save)
        bar.close()
        final = publish_final(acc, out, self.write_final, {"policy": self.policy})
        finish_trackers(acc)
        return final

    def _start(self, out: Path) -> None:
        """Resume (dropping metrics past the checkpoint), write config.yaml, and say what the run will do."""
        cfg, acc = self.cfg, self.accelerator
        resume_from = resume_state(acc, cfg.resume, out, "ppo")
        if resume_from is not None:
            acc.print(f"[ppo] resumed from {resume_from} at iteration {self.progress.step}")
            drop_metrics_after(acc, self.progress.step)
        if acc.is_main_process:
            save_config(cfg, out / "config.yaml")
        acc.print(
            f"[ppo] {len(self.prompts.ids)} prompts, {self.total_steps} iterations of {cfg.train.batch_size} "
            f"episodes, {cfg.ppo.ppo_epochs} epochs x {cfg.train.batch_size // cfg.ppo.mini_batch_size} "
            f"minibatches; ptx {cfg.ptx.ptx_coef} x {self.learner.ptx_per_mini} sequences per minibatch; "
            f"{self.prompts.report.prompts_cut} prompts cut to data.format.max_prompt_length"
        )
        if self.learner.group_size > 1:
            acc.print(
                f"[ppo] minibatches of whole groups of {self.learner.group_size} episodes; the update's forwards "
                + (
                    "run each prompt once"
                    if self.learner.share_prompt
                    else "run every episode whole (rollout.share_prompt off, train.compile, gradient checkpointing "
                    "or sharded parameters)"
                )
            )
        if cfg.models.reference == "none":
            acc.print(
                "[ppo] models.reference: none: no reference model, no KL to it logged (kl_coef 0); rlhf eval "
                "measures the KL to SFT"
            )
        if self.experience.old_logprobs_from_update:
            acc.print(
                "[ppo] one optimizer step per rollout with the KL out of the reward: the old log-probs are the "
                "update's own forward (the ratio is exactly 1), no scoring forward of their own"
            )
        if self.roles.lanes.concurrent:
            acc.print(
                f"[ppo] policy and critic (updates, scoring) side by side on "
                f"{' + '.join(map(str, self.roles.lanes.shares))} CPU threads (train.concurrent_models: off runs "
                "them in sequence)"
            )
        if self.kl_budget.exceeded:  # resumed from the checkpoint a KL-budget stop wrote: nothing left to train
            acc.print(f"[ppo] the KL budget ({cfg.kl.budget}) was spent at iteration {self.progress.step}")
        if self.collapse.stopped:
            acc.print(f"[ppo] the collapse guard stopped this run at iteration {self.progress.step}")

    def iteration(self, step: int) -> tuple[Rollout, dict, str | None]:
        """One PPO iteration: experience, the learner's update, then the monitors that read its KL and rollout.
        -> (the rollout, the iteration's statistics, why the run must stop now or None)."""
        cfg, acc = self.cfg, self.accelerator
        t0 = time.time()
        ro, timing = self.experience.make(step)
        stats = self.experience.advantages(ro)
        t1 = time.time()
        # a NaN/inf reward or advantage (e.g. a broken reward model) must never reach the weights
        numbers = {"scores": ro.scores, "values": ro.values, "advantages": ro.advantages}
        if not self.guard.skip(acc, step, numbers):
            stats |= self.learner.update(ro, step).logged()  # fills ro.logprobs when its forward gives them
            self.experience.generator.sync_weights()
        if ro.logprobs is None and ro.ref_logprobs is not None:  # the update that was to give them was skipped
            ro.logprobs = self.experience.old_logprobs(ro)
        stats |= self.experience.kl_stats(ro)
        t2 = time.time()
        stop_reason = self._observe(stats)
        self.progress.step += 1
        self.progress.samples += cfg.train.batch_size
        tokens = ro.attention_mask.sum().item()
        stats |= timing | {
            "time/train": t2 - t1,
            "time/iteration": t2 - t0,
            "tokens_per_s": tokens / (t2 - t0),
            "lr": self.roles.actor.scheduler.get_last_lr()[0],
            "episodes": self.progress.samples,
        }
        return ro, stats, stop_reason

    def _observe(self, stats: dict) -> str | None:
        """Feed the KL controller, the KL budget and the collapse monitor this iteration's statistics (adding
        theirs to `stats`) -> why the run must stop now (the KL budget spent, collapse with collapse.stop), or None."""
        cfg = self.cfg
        over_budget = False
        if "objective/kl" in stats:  # measured against the reference (none: beta 0, no budget, nothing to feed)
            # the controller sees the mean per-sequence KL of this batch, over batch_size episodes
            kl = float(stats["objective/kl"])
            self.kl_ctl.update(kl, cfg.train.batch_size, stats["objective/kl_penalty_share"])
            over_budget = self.kl_budget.update(kl)
            stats["objective/kl_smoothed"] = self.kl_budget.smoothed
        signs = [stats[f"rollout/{k}"] for k in ("repeat_share", "distinct2", "response_length", "eos_share")]
        collapse = self.collapse.update(dict(zip(CollapseMonitor.KEYS, signs)))
        stats["rollout/collapse_flags"] = len(collapse)
        collapse_stop = bool(collapse) and cfg.collapse.stop
        if over_budget:
            stats["stop/kl_budget"] = 1
        if collapse_stop:
            stats["stop/collapse"] = 1
            self.collapse.stopped = True
        if over_budget:
            return (
                f"smoothed KL {self.kl_budget.smoothed:.3f} passed kl.budget {cfg.kl.budget} (mean of the "
                f"last {cfg.kl.budget_window} iterations)"
            )
        if collapse_stop:
            return f"collapse signs (last {cfg.collapse.window} iterations' mean): {'; '.join(collapse)}"
        return None

    def save(self, step: int) -> Path:
        """checkpoint-<step>: the policy and value model in HF form plus the whole training state."""
        models = {"policy": self.policy} | ({"value": self.value_model} if self.roles.critic is not None else {})
        cfg = self.cfg
        return save_checkpoint(
            self.accelerator, cfg.output_dir, step, models, self.roles.tokenizer, cfg, cfg.checkpoint.keep_last
        )

    def log_samples(self, ro: Rollout, step: int) -> None:
        n = min(self.cfg.logging.num_samples, ro.query_responses.shape[0])
        if not n:
            return
        prompts = self.roles.tokenizer.batch_decode(
            ro.query_responses[:n, : ro.prompt_width], skip_special_tokens=True
        )
        responses = decode_responses(self.roles.tokenizer, ro.query_responses[:n, ro.prompt_width :])
        log_text(
            self.accelerator,
            self.cfg.output_dir,
            step,
            [
                {"prompt": p, "response": r, "score": round(float(s), 4)}
                for p, r, s in zip(prompts, responses, ro.raw_scores[:n])
            ],
        )

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The held-out scores of the policy, with the EMA weights swapped in when there are any."""
        policy = self.accelerator.unwrap_model(self.policy)
        backup = None
        if self.ema is not None:
            backup = {n: p.detach().clone() for n, p in policy.named_parameters() if n in self.ema.shadow}
            self.ema.copy_to(policy)
        p = self.prompts
        result = held_out_scores(
            self.cfg, self.accelerator, self.policy, p.eval_rows, p.eval_ids, self.experience.scorer
        )
        if backup is not None:
            for n, p in policy.named_parameters():
                if n in backup:
                    p.data.copy_(backup[n])
        return result

    def write_final(self, path: Path) -> None:
        acc, cfg = self.accelerator, self.cfg
        if self.ema is not None:
            self.ema.copy_to(acc.unwrap_model(self.policy))
        save_final(acc, final_model(acc, self.policy, cfg.models.policy.lora), path, self.roles.tokenizer, cfg)


def train(cfg: PPOConfig, source: str = "<config>") -> Path:
    """Run PPO(-ptx) to completion; returns `<output_dir>/final` (the policy, EMA weights if enabled)."""
    return PPOTrainer(cfg, source).train()
