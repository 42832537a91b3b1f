"""Stage 3: PPO against the reward model with a per-token KL penalty to SFT and the pretraining mix (PPO-ptx).

Four roles: the policy (from SFT, trained), the frozen reference (SFT weights: a second copy, or the LoRA policy
with its adapter disabled), the value model (from the reward model, as InstructGPT does; trained) and the frozen
reward model (or a reward function, or both). Dropout is off in all of them. One iteration:

  1. rollout   sample rollout.samples_per_prompt responses per prompt from the policy's own distribution (left-
               padded prompts, KV cache, stop at EOS); each episode from its own seeded random stream
  2. score     RM score at the EOS token (an ensemble: mean, mean - lambda*std or min of its members) and/or
               reward.function; old log-probs, reference log-probs, values (one forward each); then every
               process's episodes are gathered on every process
  3. rewards   r_t = -beta * KL_t, plus the score at the last response token (missing-EOS penalty optional); with
               kl.placement: loss the KL leaves the reward and becomes a loss term (GRPO)
  4. advantages  ppo.advantage: GAE with the value model (default; whitened), REINFORCE with a learned or batch-mean
               baseline, or the critic-free RLOO / GRPO from each prompt's group (docs/algorithms.md)
  5. update    ppo_epochs over shuffled minibatches: -L^CLIP (or -L^KLPEN, adaptive beta) + vf_coef * L^VF (with a
               critic) - ent_coef * H, token means over the minibatch; for each minibatch the gamma_ptx-weighted
               pretraining LM gradients accumulate into the same buffers before the one optimizer step
               (InstructGPT App. C.4; not DeepSpeed-Chat's separate step)
  6. log (with the signs of reward hacking: length, EOS share, distinct-n, ensemble std) / KL controller
     (fixed beta, PI control toward kl.target, or Ziegler's) / KL budget (a hard stop) / EMA / checkpoint

N processes compute the 1-process iteration: episode i is sampled on process i mod N, the rollout is gathered, and
each process takes every N-th episode of the same minibatches (docs/scaling.md). SIGTERM/SIGINT end the iteration
with a checkpoint; NaN/inf rewards, advantages, losses or gradient norms skip the update or stop the run
(rlhf.training, docs/reliability.md).

Departures from the paper: `value_init: policy` starts a separate value network from the SFT weights rather
than putting a value head on the policy trunk.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.algorithms import ADVANTAGE_ESTIMATORS, POLICY_OBJECTIVES, AdvantageSettings, ObjectiveSettings
from rlhf.batching import (
    BatchSchedule,
    TruncationReport,
    collate_lm,
    encode_prompts,
    encode_sft,
    encode_text,
    pad,
    response_sequences,
)
from rlhf.collapse import CollapseMonitor, repeat_share
from rlhf.config import ConfigError, PPOConfig, check_paths, load_function, save_config
from rlhf.data import load_source
from rlhf.kl_control import KLBudget, build_kl_controller, penalty_share
from rlhf.models import (
    TokenValueModel,
    causal_logits,
    load_causal_lm,
    load_reward_ensemble,
    load_reward_model,
    load_tokenizer,
    reward_members,
    reward_scores,
)
from rlhf.ppo_math import (
    KLPenaltyCoef,
    aggregate_ensemble,
    compute_rewards,
    distinct_n,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    lm_loss,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    truncate_after_eos,
    value_loss,
)
from rlhf.sampling import decode_responses, episode_seed, generate
from rlhf.training import (
    GracefulStop,
    ModelLanes,
    NonFiniteGuard,
    Progress,
    ProgressBar,
    build_optimizer,
    build_scheduler,
    checkpoint_or_stop,
    clip_grad_norm,
    compiled_for_training,
    concurrent_models,
    drop_metrics_after,
    final_model,
    generation_context,
    log_metrics,
    log_text,
    make_accelerator,
    prepare_frozen,
    publish_final,
    resume_state,
    save_checkpoint,
    save_final,
    seed_everything,
    sharded_parameters,
    split_batch,
)

# the per-minibatch statistics of the update, in the order minibatch_step returns them
MINIBATCH_STATS = (
    "loss/policy_avg",
    "loss/value_avg",
    "policy/entropy_avg",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "val/clipfrac_avg",
    "policy/ratio_avg",
    "ptx/loss",
    "policy/grad_norm",
    "policy/kl_old",
    "loss/kl_avg",
)
ROLLOUT_STREAM, EVAL_STREAM = 0, 1  # keys of the per-episode sampling seeds

# --------------------------------------------------------------------------------------------------
# State objects checkpointed with the run
# --------------------------------------------------------------------------------------------------


class RunningMoments:
    """Running mean/std of RM scores (Chan et al. parallel update), for optional score normalisation."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        batch_mean, batch_var, n = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


class EMA:
    """Exponential moving average of the policy weights (InstructGPT: decay 0.992), for eval and the final save."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


# --------------------------------------------------------------------------------------------------
# Forwards on (prompt + response) batches; P = prompt width (left-padded), R = response width
# --------------------------------------------------------------------------------------------------


def response_logprobs(
    model, query_responses, attention_mask, prompt_width: int, temperature: float, entropy=False, entropy_grad=True
):
    """[B,P+R] -> log-probs [B,R] of the response tokens (and entropies [B,R]) at the sampling temperature."""
    response_width = query_responses.shape[1] - prompt_width
    # the logits that predict the response tokens: positions P-1 .. P+R-2 (the LM head skips the rest of the prompt)
    logits = causal_logits(model, query_responses, attention_mask, last=response_width + 1)[:, :-1]
    logprobs = logprobs_from_logits(logits, query_responses[:, prompt_width:], temperature)
    if not entropy:
        return logprobs
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logprobs, entropy_from_logits(logits, temperature)


def response_values(value_model, query_responses, attention_mask, prompt_width: int) -> torch.Tensor:
    """[B,P+R] -> V(s_t) [B,R]: the value of the state before each response token (a TokenValueModel)."""
    return value_model(query_responses, attention_mask)[:, prompt_width - 1 : -1]


@dataclass
class Rollout:
    """One iteration's episodes on this process. Tensors are [B, P+R] (sequences) or [B, R] (per token)."""

    query_responses: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_width: int
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    raw_scores: torch.Tensor
    score_std: torch.Tensor
    ended: torch.Tensor
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


class PPOTrainer:
    """Holds the four roles, their optimizers and the data; `train()` runs the iterations."""

    def __init__(self, cfg: PPOConfig, source: str = "<config>"):
        check_paths(cfg, source)
        self.cfg = cfg
        acc = self.accelerator = make_accelerator(
            cfg.train.mixed_precision, cfg.output_dir, cfg.logging.tensorboard, cfg.train.cpu
        )
        seed_everything(cfg.seed)
        m = cfg.models
        self.tokenizer = load_tokenizer(m.policy, fmt=cfg.data.format)
        self.reward_tokenizer = load_tokenizer(m.reward, fmt=cfg.data.format) if m.reward.name_or_path else None
        self.same_tokenizer = self.reward_tokenizer is None or (
            self.reward_tokenizer.get_vocab() == self.tokenizer.get_vocab()
        )
        self.critic = cfg.uses_critic()
        if not self.same_tokenizer and m.value_init == "reward" and self.critic:
            raise ConfigError(
                f"models.reward ({m.reward.name_or_path}) has a different tokenizer from the policy, so the value "
                "model cannot start from it (values are read per policy token); set models.value_init: policy"
            )
        if m.reference == "disable_adapter":
            _check_adapter_reference(m.policy)
        if cfg.ema.decay and sharded_parameters(acc):
            raise ConfigError(
                "ema.decay > 0 with FSDP / DeepSpeed ZeRO-3: each process holds a shard of the policy, so an EMA of "
                "its parameters would be an EMA of a shard; set ema.decay: 0 or use DDP / ZeRO-1/2"
            )

        # every process samples the same number of episodes and takes the same share of each minibatch
        split_batch(cfg.train.batch_size, 1, acc.num_processes, "train.batch_size")
        split_batch(cfg.ppo.mini_batch_size, cfg.ppo.micro_batch_size, acc.num_processes, "ppo.mini_batch_size")

        # data: prompts (rendered exactly as in SFT and RM), optional eval prompts and ptx text
        fmt = cfg.data.format
        self.prompt_report = TruncationReport()
        ds = load_source(cfg.data.prompts, "prompts", on_bad_row=fmt.on_bad_row)
        self.prompt_rows = ds.to_list()
        self.prompts = encode_prompts(self.tokenizer, fmt, self.prompt_rows, self.prompt_report)
        self.schedule = BatchSchedule(
            [len(p) for p in self.prompts],
            cfg.train.batch_size // cfg.rollout.samples_per_prompt,  # prompts per iteration
            cfg.seed,
            group_by_length=False,
            what=cfg.data.prompts.path,
        )
        self.eval_prompts = []
        if cfg.data.eval_prompts.path:
            ds = load_source(cfg.data.eval_prompts, "prompts", on_bad_row=fmt.on_bad_row)
            self.eval_rows = ds.to_list()
            self.eval_prompts = encode_prompts(self.tokenizer, fmt, self.eval_rows)
        self.ptx_examples = []
        if cfg.ptx.ptx_coef > 0:
            ds = load_source(cfg.ptx.data, cfg.ptx.kind, on_bad_row=fmt.on_bad_row)
            if cfg.ptx.kind == "text":
                self.ptx_examples = encode_text(self.tokenizer, ds["text"], cfg.ptx.max_length, TruncationReport())
            else:  # whole conversations, loss on every token (the prompt is text to model too)
                ptx_fmt = copy.deepcopy(fmt)
                ptx_fmt.max_length = cfg.ptx.max_length
                report = TruncationReport()
                self.ptx_examples = encode_sft(self.tokenizer, ptx_fmt, ds, cfg.ptx.data.path, False, report)
        self._ptx_cached: tuple[int, list[int]] = (-1, [])  # (epoch, permutation) of the ptx text
        # ptx sequences per minibatch (all processes), a multiple of the process count so each takes as many
        world = acc.num_processes
        per_mini = cfg.ptx.sequences_per_episode * cfg.ppo.mini_batch_size / world
        self.ptx_per_mini = world * round(per_mini) if self.ptx_examples else 0
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * self.schedule.steps_per_epoch))

        # models: dropout off in all four (N+ detail 1)
        self.policy = load_causal_lm(m.policy, self.tokenizer, dropout=False, key="models.policy.name_or_path")
        self.reference = None
        if m.reference == "copy":
            ref_cfg = copy.deepcopy(m.policy)
            ref_cfg.lora.enabled, ref_cfg.gradient_checkpointing = False, False
            reference = load_causal_lm(ref_cfg, self.tokenizer, dropout=False, key="models.policy.name_or_path")
            self.reference = prepare_frozen(acc, reference)
        # one reward model, or the PPO members of an ensemble (scores combined by reward.aggregate); each one
        # forward module (TokenValueModel), so sharding wrappers see the whole forward. And/or a reward function.
        members = load_reward_ensemble(m.reward, self.reward_tokenizer) if m.reward.name_or_path else []
        self.reward_models = [prepare_frozen(acc, TokenValueModel(rm)) for rm in members]
        self.reward_fn = load_function(cfg.reward.function, "reward.function") if cfg.reward.function else None

        updates = self.total_steps * cfg.ppo.ppo_epochs * (cfg.train.batch_size // cfg.ppo.mini_batch_size)
        # the warm-up counts PPO iterations (InstructGPT: 10 iterations from 1/10 of the peak)
        warm = copy.deepcopy(cfg.optim)
        warm.warmup_steps = cfg.optim.warmup_steps * (updates // self.total_steps)
        policy_opt = build_optimizer(self.policy.parameters(), cfg.optim)
        self.policy, self.policy_opt, self.policy_sched = acc.prepare(
            self.policy, policy_opt, build_scheduler(policy_opt, warm, updates)
        )
        # the critic (GAE, REINFORCE with a learned baseline); critic-free estimators never load one
        self.value_model = self.value_opt = self.value_sched = None
        if self.critic:
            value_cfg = copy.deepcopy(m.reward if m.value_init == "reward" else m.policy)
            if m.value_init == "reward":
                value_cfg.name_or_path = reward_members(m.reward.name_or_path)[0]
            value_cfg.lora.enabled = False
            value_cfg.gradient_checkpointing = m.policy.gradient_checkpointing
            # from the RM its trained head is the value head's start; from the policy a new head is expected
            value_key = "models.reward.name_or_path" if m.value_init == "reward" else "models.policy.name_or_path"
            value_model = TokenValueModel(
                load_reward_model(
                    value_cfg, self.tokenizer, train=True, new_head=m.value_init == "policy", key=value_key
                )
            )
            value_opt = build_optimizer(value_model.parameters(), cfg.optim, lr=cfg.value_lr or cfg.optim.lr)
            self.value_model, self.value_opt, self.value_sched = acc.prepare(
                value_model, value_opt, build_scheduler(value_opt, warm, updates)
            )

        # the update's differentiated forwards only (train.compile); rollout, scoring and saving use the eager roles
        self.policy_train = compiled_for_training(acc, self.policy, cfg.train.compile)
        self.value_train = compiled_for_training(acc, self.value_model, cfg.train.compile) if self.critic else None
        # the policy's and the critic's work side by side on a CPU (same computation, sooner)
        side_by_side = self.critic and concurrent_models(
            acc, cfg.train.concurrent_models, [self.policy, self.value_model]
        )
        self.lanes = ModelLanes(side_by_side)
        self.kl_ctl = build_kl_controller(cfg.kl)
        self.kl_budget = KLBudget(cfg.kl.budget, cfg.kl.budget_window)
        self.klpen = KLPenaltyCoef(cfg.ppo.klpen_coef, cfg.ppo.klpen_target)  # L^KLPEN's beta (objective: klpen)
        self.score_moments = RunningMoments()
        self.progress = Progress()
        self.ema = EMA(acc.unwrap_model(self.policy), cfg.ema.decay) if cfg.ema.decay else None
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_skips, "ppo")
        self.collapse = CollapseMonitor(cfg.collapse, cfg.collapse.window)
        # one registered object for both stop rules: accelerate numbers custom states by position, and a new
        # position would make checkpoints written before the collapse guard existed unloadable
        stop_rules = StopRules(self.kl_budget, self.collapse)
        acc.register_for_checkpointing(
            self.progress, self.kl_ctl, self.score_moments, stop_rules, self.guard, self.klpen
        )
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)

    # ---- 1-3: rollout, scoring, rewards -----------------------------------------------------------

    def episode_rows(self, step: int) -> list[int]:
        """Prompt row of each of iteration `step`'s episodes, in the global order (a pure function of the step);
        the rollout.samples_per_prompt responses to a prompt are consecutive episodes (a group)."""
        k = self.cfg.rollout.samples_per_prompt
        return [row for row in self.schedule(step) for _ in range(k)]

    @torch.no_grad()
    def rollout(self, step: int) -> tuple[Rollout, dict]:
        """Sample and score this process's share of the iteration's episodes; returns every process's episodes.

        Episode i of the iteration is sampled on process i % num_processes with its own random stream (seeded by
        run seed, iteration and i) and prompts are left-padded to the widest prompt of the whole iteration, so the
        gathered rollout is the one a single process would sample (up to float rounding in the forwards).
        """
        cfg, acc, tok = self.cfg, self.accelerator, self.tokenizer
        episodes = self.episode_rows(step)
        positions = list(range(acc.process_index, len(episodes), acc.num_processes))
        row_ids = [episodes[i] for i in positions]
        prompts = [self.prompts[j] for j in row_ids]
        rows = [self.prompt_rows[j] for j in row_ids]
        seeds = [episode_seed(cfg.seed, ROLLOUT_STREAM, step, i) for i in positions]
        t0 = time.time()
        # 1. sample: one left-padded prompt tensor so every chunk shares the prompt width P
        P = max(len(self.prompts[j]) for j in episodes)
        prompt_ids = pad(prompts, tok.pad_token_id, side="left", width=P)
        prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left", width=P)
        chunks = []
        gen_batch = cfg.rollout.generation_batch_size
        # sampled under the same autocast as the scoring forwards that compute the old log-probs
        with generation_context(acc, self.policy) as (policy, synced), acc.autocast():
            for s in range(0, len(prompts), gen_batch):
                _, _, resp = generate(
                    policy,
                    tok,
                    prompts[s : s + gen_batch],
                    cfg.rollout.max_new_tokens,
                    cfg.rollout.temperature,
                    cfg.rollout.top_k,
                    cfg.rollout.top_p,
                    seeds=seeds[s : s + gen_batch],
                    synced=synced,
                )
                chunks.append(resp.tolist())
        responses = pad([r for c in chunks for r in c], tok.pad_token_id).to(acc.device)
        responses, response_mask = truncate_after_eos(responses, tok.eos_token_id, tok.pad_token_id)
        ended = (responses == tok.eos_token_id).any(-1)
        query_responses = torch.cat([prompt_ids.to(acc.device), responses], 1)
        attention_mask = torch.cat([prompt_mask.to(acc.device), response_mask.long()], 1)
        t1 = time.time()

        # 2. score: old log-probs, reference log-probs, values, RM scores; micro-batched forwards (through the
        # wrappers when parameters are sharded: a sharded module's forward gathers them)
        sharded = sharded_parameters(acc)
        policy = self.policy if sharded else acc.unwrap_model(self.policy)
        value_model = self.value_model if sharded or not self.critic else acc.unwrap_model(self.value_model)
        mb = cfg.ppo.micro_batch_size * 4
        logprobs, ref_logprobs, values, scores, score_std = [], [], [], [], []
        for s in range(0, len(prompts), mb):
            qr, am = query_responses[s : s + mb], attention_mask[s : s + mb]
            where = [f"prompt row {j} of {cfg.data.prompts.path}" for j in row_ids[s : s + mb]]
            # the policy and reference | the critic and reward models: side by side with train.concurrent_models
            (old, ref), (vals, mb_scores, mb_std) = self.lanes.run(
                functools.partial(self.rollout_logprobs, policy, qr, am, P),
                functools.partial(self.rollout_values_and_scores, value_model, qr, am, P, rows[s : s + mb], where),
            )
            logprobs.append(old)
            ref_logprobs.append(ref)
            values.append(vals if self.critic else torch.zeros_like(old))
            scores.append(mb_scores)
            score_std.append(mb_std)
        raw_scores = torch.cat(scores)
        ro = Rollout(
            query_responses,
            attention_mask,
            response_mask,
            P,
            torch.cat(logprobs),
            torch.cat(ref_logprobs),
            torch.cat(values),
            raw_scores.clone(),
            raw_scores,
            torch.cat(score_std),
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

    def rollout_logprobs(self, policy, query_responses, attention_mask, prompt_width: int):
        """Old (the policy's) and reference log-probs [B,R] of a micro-batch of episodes [B,P+R]."""
        args = (query_responses, attention_mask, prompt_width, self.cfg.rollout.temperature)
        with self.accelerator.autocast():
            old = response_logprobs(policy, *args)
            if self.reference is None:
                with self.accelerator.unwrap_model(self.policy).disable_adapter():
                    return old, response_logprobs(policy, *args)
            return old, response_logprobs(self.reference, *args)

    def rollout_values_and_scores(self, value_model, query_responses, attention_mask, prompt_width: int, rows, where):
        """Values [B,R] (None without a critic), scores [B] and the ensemble's std [B] of a micro-batch [B,P+R]."""
        with self.accelerator.autocast():
            values = None
            if self.critic:
                values = response_values(value_model, query_responses, attention_mask, prompt_width)
            return values, *self.score(query_responses, attention_mask, prompt_width, rows, where)

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
            *(everywhere(t, 0) for t in (ro.logprobs, ro.ref_logprobs, ro.values)),
            *(everywhere(t, 0) for t in (ro.scores, ro.raw_scores, ro.score_std, ro.ended)),
        )

    def score(
        self, query_responses, attention_mask, prompt_width: int, rows: list[dict], where: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [B] of (prompt + response) sequences [B,P+R], and the reward-model ensemble's std [B].

        The reward model's normalised score is read at the last real token (EOS); with an ensemble it is
        `reward.aggregate` of the members' scores (one member: its score, std 0). With a different RM tokenizer the
        raw prompt is rendered for the RM exactly as in RM training and the decoded response appended, then
        re-tokenized (TRL and OpenRLHF refuse this case). `reward.function` scores the raw prompt and the decoded
        response; with both, the score is model_weight * RM + function_weight * function. `where` names each row
        for error messages.
        """
        zeros = torch.zeros(query_responses.shape[0], device=query_responses.device)
        scores, score_std = zeros, zeros
        r = self.cfg.reward
        if self.reward_models:
            ids, mask = query_responses, attention_mask
            if not self.same_tokenizer:
                rtok = self.reward_tokenizer
                responses = query_responses[:, prompt_width:]
                ended = (responses == self.tokenizer.eos_token_id).any(-1).tolist()
                texts = decode_responses(self.tokenizer, responses)
                seqs = response_sequences(rtok, self.cfg.data.format, rows, texts, ended)
                ids = pad(seqs, rtok.pad_token_id).to(query_responses.device)
                mask = pad([[1] * len(s) for s in seqs], 0).to(query_responses.device)
            member_scores = torch.stack([reward_scores(rm, ids, mask) for rm in self.reward_models])
            scores, score_std = aggregate_ensemble(member_scores, r.aggregate, r.std_coef)
            if self.reward_fn is None:
                return scores, score_std
            scores, score_std = r.model_weight * scores, r.model_weight * score_std
        texts = decode_responses(self.tokenizer, query_responses[:, prompt_width:])
        values = []
        for row, text, label in zip(rows, texts, where):
            try:
                values.append(float(self.reward_fn(row["prompt"], text)))
            except Exception as e:  # a user's function: say which row broke it, and that nothing is lost
                raise ConfigError(
                    f"reward.function {r.function} failed on {label} (prompt {row['prompt'][:80]!r}, response "
                    f"{text[:80]!r}): {type(e).__name__}: {e}. The last checkpoint, if any, is intact"
                ) from e
        return scores + r.function_weight * torch.tensor(values, device=scores.device), score_std

    def compute_advantages(self, ro: Rollout) -> dict:
        """3-4. Per-token rewards (KL-penalised unless the KL is a loss term), then the advantages of
        `ppo.advantage` over the whole iteration; returns its stats."""
        cfg, p = self.cfg, self.cfg.ppo
        mask = ro.response_mask
        beta_in_reward = self.kl_ctl.value if cfg.kl.placement == "reward" else 0.0
        ro.rewards, non_score_reward, _ = compute_rewards(
            ro.scores, ro.logprobs, ro.ref_logprobs, mask, beta_in_reward, cfg.kl.estimator
        )
        rewards = masked_whiten(ro.rewards, mask, shift_mean=False) if cfg.reward.whiten_rewards else ro.rewards
        values = torch.where(mask, ro.values, torch.zeros_like(ro.values))
        settings = AdvantageSettings(p.gamma, p.lam, cfg.rollout.samples_per_prompt, self.critic)
        ro.advantages, ro.returns = ADVANTAGE_ESTIMATORS[p.advantage](rewards, values, mask, settings)
        k1 = (kl_penalty(ro.logprobs, ro.ref_logprobs, "k1") * mask).sum(1)
        k3 = (kl_penalty(ro.logprobs, ro.ref_logprobs, "k3") * mask).sum(1)
        # what shows reward hacking as it happens: diversity of the batch, and the reward models' disagreement
        content = ro.response_mask & (ro.query_responses[:, ro.prompt_width :] != self.tokenizer.eos_token_id)
        tokens = [r[m].tolist() for r, m in zip(ro.query_responses[:, ro.prompt_width :], content)]
        hacking = {"rollout/distinct1": distinct_n(tokens, 1), "rollout/distinct2": distinct_n(tokens, 2)}
        c = cfg.collapse
        hacking["rollout/repeat_share"] = repeat_share(tokens, c.max_ngram, c.repeat_times)
        # the KL penalty's share of the return's spread (1 at the KL-regularised optimum): the anti-windup's gate
        hacking["objective/kl_penalty_share"] = min(penalty_share(self.kl_ctl.value, k1, ro.scores), 1e6)
        # the batch KL's standard error: how much of its iteration-to-iteration movement is sampling noise
        hacking["objective/kl_stderr"] = k1.std() / math.sqrt(k1.numel()) if k1.numel() > 1 else k1.new_zeros(())
        if len(self.reward_models) > 1:
            hacking["objective/ensemble_std"] = ro.score_std.mean()
        scores = ro.scores
        if self.critic:
            hacking["val/explained_variance"] = explained_variance(ro.values, ro.returns, mask)
        return hacking | {
            "objective/scores": scores.mean(),
            "objective/scores_std": scores.std() if scores.numel() > 1 else scores.new_zeros(()),
            "objective/rm_score_raw": ro.raw_scores.mean(),
            "objective/kl": k1.mean(),
            "objective/kl_k3": k3.mean(),
            "objective/non_score_reward": non_score_reward.sum(1).mean(),
            "objective/rlhf_reward": ro.rewards.sum(1).mean(),
            "objective/kl_coef": self.kl_ctl.value,
            "rollout/response_length": mask.sum(1).float().mean(),
            "rollout/eos_share": ro.ended.float().mean(),
        }

    # ---- 5: PPO epochs ------------------------------------------------------------------------------

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

    def update(self, ro: Rollout, step: int) -> dict:
        """5. ppo_epochs over shuffled minibatches of the iteration's episodes; each process takes every
        num_processes-th episode of a minibatch, so the minibatches are those of one process."""
        cfg, p = self.cfg, self.cfg.ppo
        g = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
        n_mini = cfg.train.batch_size // p.mini_batch_size
        self.policy.train()
        if self.critic:
            self.value_model.train()
        sums: list[torch.Tensor] = []
        stop = False
        for epoch in range(p.ppo_epochs):
            order = torch.randperm(cfg.train.batch_size, generator=g).tolist()
            for mini in range(n_mini):
                minibatch = order[mini * p.mini_batch_size : (mini + 1) * p.mini_batch_size]
                ptx = self.ptx_batch(step, epoch, mini) if self.ptx_per_mini else []
                mb_stats = self.minibatch_step(ro, minibatch, ptx)
                sums.append(mb_stats)
                if p.target_approx_kl and mb_stats[MINIBATCH_STATS.index("policy/approxkl_avg")] > p.target_approx_kl:
                    stop = True  # early stop of the epoch loop on an approx-KL bound (the same on every process)
                    break
            if stop:
                break
        per_minibatch = torch.stack(sums)
        means = per_minibatch.mean(0).tolist()  # one host sync for the iteration's statistics
        unused = set()
        if not self.ptx_per_mini:
            unused.add("ptx/loss")
        if not self.critic:
            unused |= {"loss/value_avg", "val/clipfrac_avg"}
        if cfg.kl.placement != "loss":
            unused.add("loss/kl_avg")
        adapts_beta = POLICY_OBJECTIVES[p.objective].adapts_beta
        if not adapts_beta:
            unused.add("policy/kl_old")
        out = {k: v for k, v in zip(MINIBATCH_STATS, means) if k not in unused}
        out["policy/epochs_done"] = epoch + (0 if stop else 1)
        if adapts_beta:
            # [PPO] sec. 4: d = KL(pi_old || pi) after the update (here: over the last epoch's minibatches) sets beta
            last_epoch = per_minibatch[-n_mini:, MINIBATCH_STATS.index("policy/kl_old")]
            self.klpen.update(float(last_epoch.mean()))
            out["policy/klpen_coef"] = self.klpen.value
        return out

    def minibatch_step(self, ro: Rollout, minibatch: list[int], ptx: list[dict]) -> torch.Tensor:
        """One optimizer step on a minibatch of episodes (indices into the rollout) and its ptx sequences.

        The loss is the token mean over the whole minibatch of the policy objective (-L^CLIP, or -L^KLPEN), plus
        vf_coef * L^VF with a critic, minus ent_coef * H, plus kl_coef * KL(pi || pi_ref) when the KL is a loss
        term (kl.placement: loss), plus ptx_coef times the token-mean LM loss of the ptx sequences: gradients of all
        accumulate over micro-batches into the same buffers before the one step. The policy and the critic share no
        parameter, so each side runs its own backward (the gradients of the summed loss), side by side with
        `train.concurrent_models`. Each process takes every num_processes-th episode (and ptx sequence); its
        micro-batch losses are weighted by their share of the minibatch's tokens times num_processes, so DDP's
        gradient average is the one-process gradient whatever the micro-batching. Returns the minibatch's
        statistics [len(MINIBATCH_STATS)], token-weighted over every process.
        """
        cfg, acc, p = self.cfg, self.accelerator, self.cfg.ppo
        P, temperature = ro.prompt_width, cfg.rollout.temperature
        rank, world = acc.process_index, acc.num_processes
        mine = minibatch[rank::world]
        micro = [mine[s : s + p.micro_batch_size] for s in range(0, len(mine), p.micro_batch_size)]
        ptx_mine = ptx[rank::world]
        ptx_micro = [ptx_mine[s : s + p.micro_batch_size] for s in range(0, len(ptx_mine), p.micro_batch_size)]
        tokens = ro.response_mask[minibatch].sum().clamp(min=1)
        ptx_tokens = max(sum(len(e["input_ids"]) - 1 for e in ptx), 1)
        column = {name: i for i, name in enumerate(MINIBATCH_STATS)}
        max_norm = cfg.optim.max_grad_norm
        objective = POLICY_OBJECTIVES[p.objective]

        def add(stats: torch.Tensor, terms: dict[str, torch.Tensor], weight) -> None:
            cols = torch.tensor([column[name] for name in terms], device=acc.device)
            stats.index_add_(0, cols, torch.stack([v.detach().float() for v in terms.values()]) * weight)

        def micro_batch(inds: list[int]):
            idx = torch.tensor(inds, device=acc.device)
            mask = ro.response_mask[idx]
            return idx, ro.query_responses[idx], ro.attention_mask[idx], mask, mask.sum() / tokens

        def policy_side() -> tuple[torch.Tensor, torch.Tensor]:
            stats = torch.zeros(len(MINIBATCH_STATS), device=acc.device)
            n_backward = len(micro) + len(ptx_micro)
            for k, inds in enumerate(micro, 1):
                idx, qr, am, mask, share = micro_batch(inds)  # share: of the minibatch's tokens
                terms: dict[str, torch.Tensor] = {}
                with self._no_sync(self.policy, k < n_backward), acc.autocast():
                    # the entropy is differentiated only when in the loss (a softmax backward over the vocabulary)
                    new_logprobs, entropy = response_logprobs(
                        self.policy_train, qr, am, P, temperature, entropy=True, entropy_grad=p.ent_coef != 0
                    )
                    old_logprobs, advantages = ro.logprobs[idx], ro.advantages[idx]
                    settings = ObjectiveSettings(p.cliprange, self.klpen.value)
                    pg_loss, pg_stats = objective.loss(new_logprobs, old_logprobs, advantages, mask, settings)
                    if objective.adapts_beta:
                        terms["policy/kl_old"] = pg_stats["kl_old"]
                    ent = masked_mean(entropy, mask)
                    loss = pg_loss - p.ent_coef * ent
                    if cfg.kl.placement == "loss":  # GRPO: beta * k3 KL(pi || pi_ref), differentiated
                        kl_term = masked_mean(kl_penalty(new_logprobs, ro.ref_logprobs[idx], "k3"), mask)
                        loss = loss + self.kl_ctl.value * kl_term
                        terms["loss/kl_avg"] = kl_term
                    acc.backward(loss * share * world)
                terms |= {
                    "loss/policy_avg": pg_loss,
                    "policy/entropy_avg": ent,
                    "policy/approxkl_avg": pg_stats["approx_kl"],
                    "policy/clipfrac_avg": pg_stats["clipfrac"],
                    "policy/ratio_avg": pg_stats["ratio_mean"],
                }
                add(stats, terms, share)
            for k, examples in enumerate(ptx_micro, len(micro) + 1):
                batch = {key: v.to(acc.device) for key, v in collate_lm(examples, self.tokenizer.pad_token_id).items()}
                with self._no_sync(self.policy, k < n_backward), acc.autocast():
                    logits = causal_logits(self.policy_train, batch["input_ids"], batch["attention_mask"])
                    ptx_loss = lm_loss(logits, batch["labels"], reduction="sum") / ptx_tokens
                    # gradients of gamma_ptx * E[-log pi(x)] accumulate into the PPO minibatch's buffers
                    acc.backward(cfg.ptx.ptx_coef * ptx_loss * world)
                stats[column["ptx/loss"]] += ptx_loss.detach().float()
            return stats, clip_grad_norm(acc, list(self.policy.parameters()), max_norm)

        def value_side() -> tuple[torch.Tensor, torch.Tensor]:
            stats = torch.zeros(len(MINIBATCH_STATS), device=acc.device)
            for k, inds in enumerate(micro, 1):  # the critic's last backward is the last PPO micro-batch's
                idx, qr, am, mask, share = micro_batch(inds)
                with self._no_sync(self.value_model, k < len(micro)), acc.autocast():
                    vpred = response_values(self.value_train, qr, am, P)
                    vf_loss, vf_stats = value_loss(
                        vpred, ro.values[idx], ro.returns[idx], mask, p.cliprange_value or None
                    )
                    acc.backward(p.vf_coef * vf_loss * share * world)
                add(stats, {"loss/value_avg": vf_loss, "val/clipfrac_avg": vf_stats["vf_clipfrac"]}, share)
            return stats, clip_grad_norm(acc, list(self.value_model.parameters()), max_norm)

        sides = self.lanes.run(policy_side, value_side) if self.critic else [policy_side()]
        stats = sum(side_stats for side_stats, _ in sides)
        if world > 1:  # every process's share: the statistics of the whole minibatch, identical everywhere
            stats = acc.reduce(stats, "sum")
        stats[column["policy/grad_norm"]] = sides[0][1]
        numbers = {k: stats[column[k]] for k in ("loss/policy_avg", "loss/value_avg", "ptx/loss", "policy/grad_norm")}
        steps = [(self.policy_opt, self.policy_sched)]
        if self.critic:
            numbers["value/grad_norm"] = sides[1][1]
            steps.append((self.value_opt, self.value_sched))
        skip = self.guard.skip(acc, self.progress.step, numbers)

        def optimizer_step(opt, sched) -> None:
            if not skip:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

        self.lanes.run(*(functools.partial(optimizer_step, opt, sched) for opt, sched in steps))
        if self.ema is not None:
            self.ema.update(acc.unwrap_model(self.policy))
        return stats

    def _no_sync(self, model, skip: bool) -> contextlib.AbstractContextManager:
        """DDP: skip a model's gradient all-reduce on all but its last backward of the step (each must sync once)."""
        return self.accelerator.no_sync(model) if skip else contextlib.nullcontext()

    # ---- 6: the loop ----------------------------------------------------------------------------------

    def train(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        out = Path(cfg.output_dir)
        resume_from = resume_state(acc, cfg.resume, out, "ppo")
        if resume_from is not None:
            acc.print(f"[ppo] resumed from {resume_from} at iteration {self.progress.step}")
            drop_metrics_after(acc, self.progress.step)
        if acc.is_main_process:
            save_config(cfg, out / "config.yaml")
        acc.print(
            f"[ppo] {len(self.prompts)} prompts, {self.total_steps} iterations of {cfg.train.batch_size} "
            f"episodes, {cfg.ppo.ppo_epochs} epochs x {cfg.train.batch_size // cfg.ppo.mini_batch_size} "
            f"minibatches; ptx {cfg.ptx.ptx_coef} x {self.ptx_per_mini} sequences per minibatch"
        )
        if self.lanes.concurrent:
            acc.print(
                f"[ppo] policy and critic (updates, scoring) side by side on "
                f"{' + '.join(map(str, self.lanes.shares))} CPU threads (train.concurrent_models: off runs them in "
                "sequence)"
            )
        bar = ProgressBar(self.total_steps, "ppo", cfg.logging.progress, self.progress.step, acc.is_main_process)
        if self.kl_budget.exceeded:  # resumed from the checkpoint a KL-budget stop wrote: nothing left to train
            acc.print(f"[ppo] the KL budget ({cfg.kl.budget}) was spent at iteration {self.progress.step}")
        if self.collapse.stopped:
            acc.print(f"[ppo] the collapse guard stopped this run at iteration {self.progress.step}")
        with GracefulStop() as stop:
            while self.progress.step < self.total_steps and not (self.kl_budget.exceeded or self.collapse.stopped):
                step = self.progress.step
                t0 = time.time()
                ro, timing = self.rollout(step)
                stats = self.compute_advantages(ro)
                t1 = time.time()
                # a NaN/inf reward or advantage (e.g. a broken reward model) must never reach the weights
                numbers = {"scores": ro.scores, "values": ro.values, "advantages": ro.advantages}
                if not self.guard.skip(acc, step, numbers):
                    stats |= self.update(ro, step)
                t2 = time.time()
                # the controller sees the mean per-sequence KL of this batch, over batch_size episodes
                kl = float(stats["objective/kl"])
                self.kl_ctl.update(kl, cfg.train.batch_size, stats["objective/kl_penalty_share"])
                over_budget = self.kl_budget.update(kl)
                stats["objective/kl_smoothed"] = self.kl_budget.smoothed
                signs = [stats[f"rollout/{k}"] for k in ("repeat_share", "distinct2", "response_length", "eos_share")]
                collapse = self.collapse.update(dict(zip(CollapseMonitor.KEYS, signs)))
                stats["rollout/collapse_flags"] = len(collapse)
                self.progress.step += 1
                self.progress.samples += cfg.train.batch_size
                tokens = ro.attention_mask.sum().item()
                stats |= timing | {
                    "time/train": t2 - t1,
                    "time/iteration": t2 - t0,
                    "tokens_per_s": tokens / (t2 - t0),
                    "lr": self.policy_sched.get_last_lr()[0],
                    "episodes": self.progress.samples,
                }
                bar.update(1, score=float(stats["objective/scores"]), kl=kl)
                step = self.progress.step
                collapse_stop = bool(collapse) and cfg.collapse.stop
                if over_budget:
                    stats["stop/kl_budget"] = 1
                if collapse_stop:
                    stats["stop/collapse"] = 1
                    self.collapse.stopped = True
                if step % cfg.logging.every == 0 or step == self.total_steps or over_budget or collapse_stop:
                    log_metrics(acc, stats, step)
                    self.log_samples(ro, step)
                if over_budget or collapse_stop:
                    # a hard stop: the policy as it is now becomes final/ (and a checkpoint, for the frontier)
                    why = (
                        f"smoothed KL {self.kl_budget.smoothed:.3f} passed kl.budget {cfg.kl.budget} (mean of the "
                        f"last {cfg.kl.budget_window} iterations)"
                        if over_budget
                        else f"collapse signs (last {cfg.collapse.window} iterations' mean): {'; '.join(collapse)}"
                    )
                    acc.print(f"[ppo] stopping at iteration {step}: {why}")
                    self.save(step)
                    break
                if self.eval_prompts and (
                    (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == self.total_steps
                ):
                    log_metrics(acc, self.evaluate(), step)
                checkpoint_or_stop(acc, stop, bar, step, self.total_steps, cfg.checkpoint.every, self.save)
        bar.close()
        final = publish_final(acc, out, self.write_final, {"policy": self.policy})
        acc.end_training()
        return final

    def save(self, step: int) -> Path:
        """checkpoint-<step>: the policy and value model in HF form plus the whole training state."""
        models = {"policy": self.policy} | ({"value": self.value_model} if self.critic else {})
        cfg = self.cfg
        return save_checkpoint(
            self.accelerator, cfg.output_dir, step, models, self.tokenizer, cfg, cfg.checkpoint.keep_last
        )

    def log_samples(self, ro: Rollout, step: int) -> None:
        n = min(self.cfg.logging.num_samples, ro.query_responses.shape[0])
        if not n:
            return
        prompts = self.tokenizer.batch_decode(ro.query_responses[:n, : ro.prompt_width], skip_special_tokens=True)
        responses = decode_responses(self.tokenizer, ro.query_responses[:n, ro.prompt_width :])
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
        """Mean RM score of the (EMA) policy's samples on the held-out prompts."""
        acc, cfg = self.accelerator, self.cfg
        policy = acc.unwrap_model(self.policy)
        backup = None
        if self.ema is not None:
            backup = {n: p.detach().clone() for n, p in policy.named_parameters() if n in self.ema.shadow}
            self.ema.copy_to(policy)
        # each held-out prompt has its own sampling stream: the training's random state is untouched, and the
        # samples are the same on any number of processes
        n = len(self.eval_prompts)
        positions = list(range(acc.process_index, n, acc.num_processes))
        counted = [1.0] * len(positions)
        share = math.ceil(n / acc.num_processes)  # equal chunk counts everywhere: sharded forwards are collective
        positions, counted = positions + [n - 1] * (share - len(positions)), counted + [0.0] * (share - len(counted))
        totals = torch.zeros(3, dtype=torch.float64, device=acc.device)  # sum of scores, of EOS endings, count
        gen_batch = cfg.rollout.generation_batch_size
        with generation_context(acc, self.policy) as (generator_model, synced), acc.autocast():
            for s in range(0, len(positions), gen_batch):
                chunk = positions[s : s + gen_batch]
                prompt_ids, prompt_mask, resp = generate(
                    generator_model,
                    self.tokenizer,
                    [self.eval_prompts[i] for i in chunk],
                    cfg.rollout.max_new_tokens,
                    cfg.rollout.temperature,
                    seeds=[episode_seed(cfg.seed, EVAL_STREAM, i) for i in chunk],
                    synced=synced,
                )
                resp, mask = truncate_after_eos(resp, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
                qr = torch.cat([prompt_ids, resp], 1)
                am = torch.cat([prompt_mask, mask.long()], 1)
                where = [f"eval prompt row {i} of {cfg.data.eval_prompts.path}" for i in chunk]
                scores = self.score(qr, am, prompt_ids.shape[1], [self.eval_rows[i] for i in chunk], where)[0]
                ended = (resp == self.tokenizer.eos_token_id).any(-1)
                weight = torch.tensor(counted[s : s + gen_batch], device=acc.device, dtype=torch.float64)
                totals += torch.stack([(scores * weight).sum(), (ended * weight).sum(), weight.sum()])
        if backup is not None:
            for n, p in policy.named_parameters():
                if n in backup:
                    p.data.copy_(backup[n])
        score_sum, eos_sum, count = acc.reduce(totals, "sum").tolist()
        return {"eval/rm_score": score_sum / count, "eval/eos_share": eos_sum / count}

    def write_final(self, path: Path) -> None:
        acc, cfg = self.accelerator, self.cfg
        if self.ema is not None:
            self.ema.copy_to(acc.unwrap_model(self.policy))
        save_final(acc, final_model(acc, self.policy, cfg.models.policy.lora), path, self.tokenizer, cfg)


class StopRules:
    """The KL budget and the collapse monitor checkpointed as one state (the budget's keys stay where they were,
    so checkpoints from before the collapse guard resume with a fresh monitor)."""

    def __init__(self, budget: KLBudget, collapse: CollapseMonitor):
        self.budget, self.collapse = budget, collapse

    def state_dict(self) -> dict:
        return self.budget.state_dict() | {"collapse": self.collapse.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.budget.load_state_dict(state_dict)
        if "collapse" in state_dict:
            self.collapse.load_state_dict(state_dict["collapse"])


def _check_adapter_reference(policy_cfg) -> None:
    """Disabling the adapter gives the SFT model only when the policy's base weights *are* the merged SFT model."""
    path = Path(policy_cfg.name_or_path)
    if policy_cfg.from_config:
        raise ConfigError("models.reference: disable_adapter cannot work with models.policy.from_config: true")
    if (path / "adapter_config.json").exists():
        raise ConfigError(
            f"models.reference: disable_adapter needs the policy to start from merged SFT weights, but "
            f"{path} is a peft adapter: disabling PPO's adapter would not give the SFT model. Save SFT with "
            "model.lora.merge_on_save: true, or use models.reference: copy"
        )


def train(cfg: PPOConfig, source: str = "<config>") -> Path:
    """Run PPO(-ptx) to completion; returns `<output_dir>/final` (the policy, EMA weights if enabled)."""
    return PPOTrainer(cfg, source).train()
