"""Stage 3: PPO against the reward model with a per-token KL penalty to SFT and the pretraining mix (PPO-ptx).

Four roles: the policy (from SFT, trained), the frozen reference (SFT weights: a second copy, or the LoRA
policy with its adapter disabled), the value model (from the reward model, as InstructGPT does; trained) and
the frozen reward model. Dropout is off in all four. One iteration:

  1. rollout   sample responses from the policy's own distribution (left-padded prompts, KV cache, stop at EOS)
  2. score     RM score at the EOS token (an ensemble: mean, mean - lambda*std or min of its members);
               old log-probs, reference log-probs, values (one forward each)
  3. rewards   r_t = -beta * KL_t, plus the score at the last response token (missing-EOS penalty optional)
  4. GAE       advantages (whitened across processes) and returns = advantages + values
  5. update    ppo_epochs over shuffled minibatches: -L_clip + vf_coef * L_vf - ent_coef * H, and for each
               minibatch the gamma_ptx-weighted pretraining LM gradients accumulate into the same buffers
               before the one optimizer step (InstructGPT App. C.4; not DeepSpeed-Chat's separate step)
  6. log (with the signs of reward hacking: length, EOS share, distinct-n, ensemble std) / KL controller
     (fixed beta, PI control toward kl.target, or Ziegler's) / KL budget (a hard stop) / EMA / checkpoint

SIGTERM/SIGINT end the iteration with a checkpoint; NaN/inf rewards, advantages, losses or gradient norms skip the
update or stop the run (rlhf.training, docs/reliability.md).

Departures from the paper: `value_init: policy` starts a separate value network from the SFT weights rather
than putting a value head on the policy trunk.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

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
from rlhf.config import ConfigError, PPOConfig, check_paths, save_config
from rlhf.data import load_source
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
    AdaptiveKLController,
    FixedKLController,
    KLBudget,
    PIKLController,
    aggregate_ensemble,
    compute_rewards,
    distinct_n,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    lm_loss,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    truncate_after_eos,
    value_loss,
)
from rlhf.sampling import decode_responses, generate
from rlhf.training import (
    GracefulStop,
    NonFiniteGuard,
    Progress,
    ProgressBar,
    build_optimizer,
    build_scheduler,
    checkpoint_or_stop,
    drop_metrics_after,
    final_model,
    log_metrics,
    log_text,
    make_accelerator,
    publish_final,
    resume_state,
    save_checkpoint,
    save_final,
    seed_everything,
    split_batch,
)

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


def response_logprobs(model, query_responses, attention_mask, prompt_width: int, temperature: float, entropy=False):
    """[B,P+R] -> log-probs [B,R] of the response tokens (and entropies [B,R]) at the sampling temperature."""
    logits = causal_logits(model, query_responses, attention_mask)[:, prompt_width - 1 : -1]
    logprobs = logprobs_from_logits(logits, query_responses[:, prompt_width:], temperature)
    return (logprobs, entropy_from_logits(logits, temperature)) if entropy else logprobs


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


def global_masked_whiten(values: torch.Tensor, mask: torch.Tensor, accelerator, shift_mean: bool = True):
    """masked_whiten with mean/variance over every process's tokens (identical to masked_whiten on one process)."""
    if accelerator.num_processes == 1:
        return masked_whiten(values, mask, shift_mean=shift_mean)
    m = mask.bool()
    stats = torch.stack([values[m].sum(), (values[m] ** 2).sum(), m.sum().to(values.dtype)]).double()
    total, total_sq, count = accelerator.reduce(stats, "sum").tolist()
    mean = total / count
    var = (total_sq - count * mean**2) / max(count - 1, 1)
    whitened = (values - mean) / math.sqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros_like(values))


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
        self.reward_tokenizer = load_tokenizer(m.reward, fmt=cfg.data.format)
        self.same_tokenizer = self.reward_tokenizer.get_vocab() == self.tokenizer.get_vocab()
        if not self.same_tokenizer and m.value_init == "reward":
            raise ConfigError(
                f"models.reward ({m.reward.name_or_path}) has a different tokenizer from the policy, so the value "
                "model cannot start from it (values are read per policy token); set models.value_init: policy"
            )
        if m.reference == "disable_adapter":
            _check_adapter_reference(m.policy)

        self.local_batch = split_batch(cfg.train.batch_size, 1, acc.num_processes, "train.batch_size")
        self.local_mini = split_batch(cfg.ppo.mini_batch_size, 1, acc.num_processes, "ppo.mini_batch_size")
        split_batch(cfg.ppo.mini_batch_size, cfg.ppo.micro_batch_size, acc.num_processes, "ppo.mini_batch_size")

        # data: prompts (rendered exactly as in SFT and RM), optional eval prompts and ptx text
        fmt = cfg.data.format
        self.prompt_report = TruncationReport()
        ds = load_source(cfg.data.prompts, "prompts", on_bad_row=fmt.on_bad_row)
        self.prompt_rows = ds.to_list()
        self.prompts = encode_prompts(self.tokenizer, fmt, self.prompt_rows, self.prompt_report)
        self.schedule = BatchSchedule(
            [len(p) for p in self.prompts],
            cfg.train.batch_size,
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
        self.ptx_per_mini = round(cfg.ptx.sequences_per_episode * self.local_mini) if self.ptx_examples else 0
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * self.schedule.steps_per_epoch))

        # models: dropout off in all four (N+ detail 1)
        self.policy = load_causal_lm(m.policy, self.tokenizer, dropout=False, key="models.policy.name_or_path")
        self.reference = None
        if m.reference == "copy":
            ref_cfg = copy.deepcopy(m.policy)
            ref_cfg.lora.enabled, ref_cfg.gradient_checkpointing = False, False
            self.reference = load_causal_lm(ref_cfg, self.tokenizer, dropout=False, key="models.policy.name_or_path")
            self.reference.requires_grad_(False).eval()
            self.reference.to(acc.device)
        # one reward model, or the PPO members of an ensemble (scores combined by reward.aggregate)
        self.reward_models = [rm.to(acc.device) for rm in load_reward_ensemble(m.reward, self.reward_tokenizer)]
        value_cfg = copy.deepcopy(m.reward if m.value_init == "reward" else m.policy)
        if m.value_init == "reward":
            value_cfg.name_or_path = reward_members(m.reward.name_or_path)[0]
        value_cfg.lora.enabled = False
        value_cfg.gradient_checkpointing = m.policy.gradient_checkpointing
        # from the RM its trained head is the value head's start; from the policy a new head is expected
        value_key = "models.reward.name_or_path" if m.value_init == "reward" else "models.policy.name_or_path"
        self.value_model = TokenValueModel(
            load_reward_model(value_cfg, self.tokenizer, train=True, new_head=m.value_init == "policy", key=value_key)
        )

        policy_opt = build_optimizer(self.policy.parameters(), cfg.optim)
        value_opt = build_optimizer(self.value_model.parameters(), cfg.optim, lr=cfg.value_lr or cfg.optim.lr)
        updates = self.total_steps * cfg.ppo.ppo_epochs * (cfg.train.batch_size // cfg.ppo.mini_batch_size)
        # the warm-up counts PPO iterations (InstructGPT: 10 iterations from 1/10 of the peak)
        per_iteration = updates // self.total_steps
        warm = copy.deepcopy(cfg.optim)
        warm.warmup_steps = cfg.optim.warmup_steps * per_iteration
        policy_sched = build_scheduler(policy_opt, warm, updates)
        value_sched = build_scheduler(value_opt, warm, updates)
        (self.policy, self.value_model, self.policy_opt, self.value_opt, self.policy_sched, self.value_sched) = (
            acc.prepare(self.policy, self.value_model, policy_opt, value_opt, policy_sched, value_sched)
        )

        self.kl_ctl = build_kl_controller(cfg.kl)
        self.kl_budget = KLBudget(cfg.kl.budget, cfg.kl.budget_window)
        self.score_moments = RunningMoments()
        self.progress = Progress()
        self.ema = EMA(acc.unwrap_model(self.policy), cfg.ema.decay) if cfg.ema.decay else None
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_skips, "ppo")
        acc.register_for_checkpointing(self.progress, self.kl_ctl, self.score_moments, self.kl_budget, self.guard)
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)

    # ---- 1-3: rollout, scoring, rewards -----------------------------------------------------------

    def batch_rows(self, step: int) -> list[int]:
        """This process's prompt rows of iteration `step` (a pure function of the step: resume is exact)."""
        acc = self.accelerator
        return self.schedule(step)[acc.process_index :: acc.num_processes]

    @torch.no_grad()
    def rollout(self, row_ids: list[int]) -> tuple[Rollout, dict]:
        cfg, acc, tok = self.cfg, self.accelerator, self.tokenizer
        prompts = [self.prompts[j] for j in row_ids]
        rows = [self.prompt_rows[j] for j in row_ids]
        policy = acc.unwrap_model(self.policy)
        t0 = time.time()
        # 1. sample: one left-padded prompt tensor so every chunk shares the prompt width P
        prompt_ids = pad(prompts, tok.pad_token_id, side="left")
        prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left")
        P = prompt_ids.shape[1]
        chunks = []
        for s in range(0, len(prompts), cfg.rollout.generation_batch_size):
            _, _, resp = generate(
                policy,
                tok,
                prompts[s : s + cfg.rollout.generation_batch_size],
                cfg.rollout.max_new_tokens,
                cfg.rollout.temperature,
                cfg.rollout.top_k,
                cfg.rollout.top_p,
            )
            chunks.append(resp.tolist())
        responses = pad([r for c in chunks for r in c], tok.pad_token_id).to(acc.device)
        responses, response_mask = truncate_after_eos(responses, tok.eos_token_id, tok.pad_token_id)
        ended = (responses == tok.eos_token_id).any(-1)
        query_responses = torch.cat([prompt_ids.to(acc.device), responses], 1)
        attention_mask = torch.cat([prompt_mask.to(acc.device), response_mask.long()], 1)
        t1 = time.time()

        # 2. score: old log-probs, reference log-probs, values, RM scores; micro-batched forwards
        mb = cfg.ppo.micro_batch_size * 4
        logprobs, ref_logprobs, values, scores, score_std = [], [], [], [], []
        temperature = cfg.rollout.temperature
        for s in range(0, len(prompts), mb):
            qr, am = query_responses[s : s + mb], attention_mask[s : s + mb]
            with acc.autocast():
                logprobs.append(response_logprobs(policy, qr, am, P, temperature))
                if self.reference is None:
                    with policy.disable_adapter():
                        ref_logprobs.append(response_logprobs(policy, qr, am, P, temperature))
                else:
                    ref_logprobs.append(response_logprobs(self.reference, qr, am, P, temperature))
                values.append(response_values(acc.unwrap_model(self.value_model), qr, am, P))
                mb_scores, mb_std = self.score(qr, am, P, rows[s : s + mb])
                scores.append(mb_scores)
                score_std.append(mb_std)
        logprobs, ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)
        values, raw_scores, score_std = torch.cat(values), torch.cat(scores), torch.cat(score_std)
        # N+ detail 3: a response cut by the length limit gets a fixed score instead of the RM's
        scores = raw_scores.clone()
        if cfg.rollout.missing_eos_penalty is not None:
            scores = torch.where(ended, scores, torch.full_like(scores, cfg.rollout.missing_eos_penalty))
        if cfg.reward.normalize:
            self.score_moments.update(acc.gather(scores))
            scores = (scores - self.score_moments.mean) / math.sqrt(self.score_moments.var + 1e-8)
        if cfg.reward.clip:
            scores = scores.clamp(-cfg.reward.clip, cfg.reward.clip)
        t2 = time.time()
        ro = Rollout(
            query_responses,
            attention_mask,
            response_mask,
            P,
            logprobs,
            ref_logprobs,
            values,
            scores,
            raw_scores,
            score_std,
            ended,
        )
        return ro, {"time/generate": t1 - t0, "time/score": t2 - t1}

    def score(
        self, query_responses, attention_mask, prompt_width: int, rows: list[dict]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised RM scores [B] read at the last real token (EOS), and the ensemble members' std [B].

        With an ensemble the score is `reward.aggregate` of the members' scores (one member: its score, std 0).
        With a different RM tokenizer the raw prompt is rendered for the RM exactly as in RM training and the
        decoded response appended, then re-tokenized (TRL and OpenRLHF refuse this case).
        """
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
        return aggregate_ensemble(member_scores, self.cfg.reward.aggregate, self.cfg.reward.std_coef)

    def compute_advantages(self, ro: Rollout) -> dict:
        """3-4. KL-penalised per-token rewards, GAE, whitened advantages; returns iteration stats."""
        cfg, acc = self.cfg, self.accelerator
        mask = ro.response_mask
        ro.rewards, non_score_reward, kl = compute_rewards(
            ro.scores, ro.logprobs, ro.ref_logprobs, mask, self.kl_ctl.value, cfg.kl.estimator
        )
        rewards = (
            global_masked_whiten(ro.rewards, mask, acc, shift_mean=False) if cfg.reward.whiten_rewards else ro.rewards
        )
        values = torch.where(mask, ro.values, torch.zeros_like(ro.values))
        advantages, ro.returns = gae(rewards, values, mask, cfg.ppo.gamma, cfg.ppo.lam)
        ro.advantages = global_masked_whiten(advantages, mask, acc)
        k1 = (kl_penalty(ro.logprobs, ro.ref_logprobs, "k1") * mask).sum(1)
        k3 = (kl_penalty(ro.logprobs, ro.ref_logprobs, "k3") * mask).sum(1)
        g = acc.gather
        scores, raw = g(ro.scores), g(ro.raw_scores)
        # what shows reward hacking as it happens: diversity of the batch, and the reward models' disagreement
        content = ro.response_mask & (ro.query_responses[:, ro.prompt_width :] != self.tokenizer.eos_token_id)
        tokens = [r[m].tolist() for r, m in zip(ro.query_responses[:, ro.prompt_width :], content)]
        distinct = torch.tensor([distinct_n(tokens, 1), distinct_n(tokens, 2)], device=acc.device)
        distinct = acc.reduce(distinct, "mean")  # per-process batch statistic, averaged over processes
        hacking = {"rollout/distinct1": distinct[0], "rollout/distinct2": distinct[1]}
        if len(self.reward_models) > 1:
            hacking["objective/ensemble_std"] = g(ro.score_std).mean()
        return hacking | {
            "objective/scores": scores.mean(),
            "objective/scores_std": scores.std() if scores.numel() > 1 else scores.new_zeros(()),
            "objective/rm_score_raw": raw.mean(),
            "objective/kl": g(k1).mean(),
            "objective/kl_k3": g(k3).mean(),
            "objective/non_score_reward": g(non_score_reward.sum(1)).mean(),
            "objective/rlhf_reward": g(ro.rewards.sum(1)).mean(),
            "objective/kl_coef": self.kl_ctl.value,
            "val/explained_variance": explained_variance(ro.values, ro.returns, mask),
            "rollout/response_length": g(mask.sum(1).float()).mean(),
            "rollout/eos_share": g(ro.ended.float()).mean(),
        }

    # ---- 5: PPO epochs ------------------------------------------------------------------------------

    def ptx_batch(self, step: int, epoch: int, mini: int) -> list[dict]:
        """Pretraining sequences for one minibatch: a deterministic walk over shuffled epochs of the text."""
        n_mini = self.local_batch // self.local_mini
        acc = self.accelerator
        start = ((step * self.cfg.ppo.ppo_epochs + epoch) * n_mini + mini) * self.ptx_per_mini * acc.num_processes
        start += acc.process_index * self.ptx_per_mini
        out, n = [], len(self.ptx_examples)
        for d in range(start, start + self.ptx_per_mini):
            e, i = divmod(d, n)
            perm = self._ptx_perm(e)
            out.append(self.ptx_examples[perm[i]])
        return out

    def _ptx_perm(self, epoch: int) -> list[int]:
        if self._ptx_cached[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            self._ptx_cached = (epoch, torch.randperm(len(self.ptx_examples), generator=g).tolist())
        return self._ptx_cached[1]

    def update(self, ro: Rollout, step: int) -> dict:
        cfg = self.cfg
        p = cfg.ppo
        stats: dict[str, list[float]] = {}
        g = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
        n_mini = self.local_batch // self.local_mini
        self.policy.train()
        self.value_model.train()
        stop = False
        for epoch in range(p.ppo_epochs):
            order = torch.randperm(self.local_batch, generator=g).tolist()
            for mini in range(n_mini):
                mb_inds = order[mini * self.local_mini : (mini + 1) * self.local_mini]
                micro = [mb_inds[s : s + p.micro_batch_size] for s in range(0, len(mb_inds), p.micro_batch_size)]
                ptx = self.ptx_batch(step, epoch, mini) if self.ptx_per_mini else []
                ptx_micro = [ptx[s : s + p.micro_batch_size] for s in range(0, len(ptx), p.micro_batch_size)]
                mb_stats = self.minibatch_step(ro, micro, ptx_micro)
                for k, v in mb_stats.items():
                    stats.setdefault(k, []).append(v)
                if p.target_approx_kl and mb_stats["policy/approxkl_avg"] > p.target_approx_kl:
                    stop = True  # early stop of the epoch loop on an approx-KL bound
                    break
            if stop:
                break
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["policy/epochs_done"] = epoch + (0 if stop else 1)
        return out

    def minibatch_step(self, ro: Rollout, micro: list[list[int]], ptx_micro: list[list[dict]]) -> dict:
        """One optimizer step: PPO loss over the minibatch's micro-batches + gamma_ptx * LM loss, accumulated."""
        cfg, acc, p = self.cfg, self.accelerator, self.cfg.ppo
        P, temperature = ro.prompt_width, cfg.rollout.temperature
        episodes = sum(len(m) for m in micro)
        sums: dict[str, float] = {}
        ptx_tokens = sum(len(e["input_ids"]) - 1 for m in ptx_micro for e in m)
        n_backward = len(micro) + len(ptx_micro)
        k = 0
        for inds in micro:
            k += 1
            idx = torch.tensor(inds, device=acc.device)
            qr, am, mask = ro.query_responses[idx], ro.attention_mask[idx], ro.response_mask[idx]
            # the value model's last backward is the last PPO micro-batch's (ptx does not touch it)
            with self._no_sync(policy=k < n_backward, value=k < len(micro)), acc.autocast():
                new_logprobs, entropy = response_logprobs(self.policy, qr, am, P, temperature, entropy=True)
                vpred = response_values(self.value_model, qr, am, P)
                pg_loss, pg_stats = policy_loss(new_logprobs, ro.logprobs[idx], ro.advantages[idx], mask, p.cliprange)
                vf_loss, vf_stats = value_loss(vpred, ro.values[idx], ro.returns[idx], mask, p.cliprange_value or None)
                ent = masked_mean(entropy, mask)
                loss = pg_loss + p.vf_coef * vf_loss - p.ent_coef * ent
                acc.backward(loss * len(inds) / episodes)
            w = len(inds) / episodes
            for name, value in (
                ("loss/policy_avg", pg_loss),
                ("loss/value_avg", vf_loss),
                ("policy/entropy_avg", ent),
                ("policy/approxkl_avg", pg_stats["approx_kl"]),
                ("policy/clipfrac_avg", pg_stats["clipfrac"]),
                ("val/clipfrac_avg", vf_stats["vf_clipfrac"]),
                ("policy/ratio_avg", pg_stats["ratio_mean"]),
            ):
                sums[name] = sums.get(name, 0.0) + w * float(value.detach())
        for examples in ptx_micro:
            k += 1
            batch = {key: v.to(acc.device) for key, v in collate_lm(examples, self.tokenizer.pad_token_id).items()}
            with self._no_sync(policy=k < n_backward, value=False), acc.autocast():
                logits = causal_logits(self.policy, batch["input_ids"], batch["attention_mask"])
                ptx_loss = lm_loss(logits, batch["labels"], reduction="sum") / max(ptx_tokens, 1)
                # gradients of gamma_ptx * E[-log pi(x)] accumulate into the PPO minibatch's buffers
                acc.backward(cfg.ptx.ptx_coef * ptx_loss)
            sums["ptx/loss"] = sums.get("ptx/loss", 0.0) + float(ptx_loss.detach())
        max_norm = cfg.optim.max_grad_norm or float("inf")
        sums["policy/grad_norm"] = float(acc.clip_grad_norm_(self.policy.parameters(), max_norm))
        value_grad_norm = float(acc.clip_grad_norm_(self.value_model.parameters(), max_norm))
        numbers = {
            k: sums[k] for k in ("loss/policy_avg", "loss/value_avg", "ptx/loss", "policy/grad_norm") if k in sums
        }
        skip = self.guard.skip(acc, self.progress.step, numbers | {"value/grad_norm": value_grad_norm})
        for opt, sched in ((self.policy_opt, self.policy_sched), (self.value_opt, self.value_sched)):
            if not skip:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(acc.unwrap_model(self.policy))
        # approx-KL across processes, so every process takes the same early-stop decision
        kl = acc.reduce(torch.tensor(sums["policy/approxkl_avg"], device=acc.device), "mean")
        sums["policy/approxkl_avg"] = float(kl)
        return sums

    def _no_sync(self, policy: bool, value: bool) -> contextlib.ExitStack:
        """DDP: skip a model's gradient all-reduce on all but its last backward of the step (each must sync once)."""
        stack = contextlib.ExitStack()
        if policy:
            stack.enter_context(self.accelerator.no_sync(self.policy))
        if value:
            stack.enter_context(self.accelerator.no_sync(self.value_model))
        return stack

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
        bar = ProgressBar(self.total_steps, "ppo", cfg.logging.progress, self.progress.step, acc.is_main_process)
        if self.kl_budget.exceeded:  # resumed from the checkpoint a KL-budget stop wrote: nothing left to train
            acc.print(f"[ppo] the KL budget ({cfg.kl.budget}) was spent at iteration {self.progress.step}")
        with GracefulStop() as stop:
            while self.progress.step < self.total_steps and not self.kl_budget.exceeded:
                step = self.progress.step
                t0 = time.time()
                ro, timing = self.rollout(self.batch_rows(step))
                stats = self.compute_advantages(ro)
                t1 = time.time()
                # a NaN/inf reward or advantage (e.g. a broken reward model) must never reach the weights
                numbers = {"scores": ro.scores, "values": ro.values, "advantages": ro.advantages}
                if not self.guard.skip(acc, step, numbers):
                    stats |= self.update(ro, step)
                t2 = time.time()
                # the controller sees the mean per-sequence KL of this batch, over batch_size episodes
                kl = float(stats["objective/kl"])
                self.kl_ctl.update(kl, cfg.train.batch_size)
                over_budget = self.kl_budget.update(kl)
                stats["objective/kl_smoothed"] = self.kl_budget.smoothed
                self.progress.step += 1
                self.progress.samples += cfg.train.batch_size
                tokens = acc.gather(ro.attention_mask.sum()).sum().item()
                stats |= timing | {
                    "time/train": t2 - t1,
                    "time/iteration": t2 - t0,
                    "tokens_per_s": tokens / (t2 - t0),
                    "lr": self.policy_sched.get_last_lr()[0],
                    "episodes": self.progress.samples,
                }
                bar.update(1, score=float(stats["objective/scores"]), kl=kl)
                step = self.progress.step
                if over_budget:
                    stats["stop/kl_budget"] = 1
                if step % cfg.logging.every == 0 or step == self.total_steps or over_budget:
                    log_metrics(acc, stats, step)
                    self.log_samples(ro, step)
                if over_budget:
                    # a hard stop: the policy as it is now becomes final/ (and a checkpoint, for the frontier)
                    acc.print(
                        f"[ppo] stopping at iteration {step}: smoothed KL {self.kl_budget.smoothed:.3f} passed "
                        f"kl.budget {cfg.kl.budget} (mean of the last {cfg.kl.budget_window} iterations)"
                    )
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
        models = {"policy": self.policy, "value": self.value_model}
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
        rng = torch.get_rng_state()  # evaluation must not shift the training's random stream
        torch.manual_seed(cfg.seed)
        mine = self.eval_prompts[acc.process_index :: acc.num_processes]
        mine_rows = self.eval_rows[acc.process_index :: acc.num_processes]
        scores, ended = [], []
        for s in range(0, len(mine), cfg.rollout.generation_batch_size):
            chunk = mine[s : s + cfg.rollout.generation_batch_size]
            prompt_ids, prompt_mask, resp = generate(
                policy, self.tokenizer, chunk, cfg.rollout.max_new_tokens, cfg.rollout.temperature
            )
            resp, mask = truncate_after_eos(resp, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
            qr = torch.cat([prompt_ids, resp], 1)
            am = torch.cat([prompt_mask, mask.long()], 1)
            scores.append(self.score(qr, am, prompt_ids.shape[1], mine_rows[s : s + len(chunk)])[0])
            ended.append((resp == self.tokenizer.eos_token_id).any(-1).float())
        torch.set_rng_state(rng)
        if backup is not None:
            for n, p in policy.named_parameters():
                if n in backup:
                    p.data.copy_(backup[n])
        return {
            "eval/rm_score": acc.gather(torch.cat(scores)).mean(),
            "eval/eos_share": acc.gather(torch.cat(ended)).mean(),
        }

    def write_final(self, path: Path) -> None:
        acc, cfg = self.accelerator, self.cfg
        if self.ema is not None:
            self.ema.copy_to(acc.unwrap_model(self.policy))
        save_final(acc, final_model(acc, self.policy, cfg.models.policy.lora), path, self.tokenizer, cfg)


def build_kl_controller(kl):
    """The beta schedule: fixed, PI control toward kl.target (default adaptive mode) or Ziegler's proportional."""
    if not kl.adaptive:
        return FixedKLController(kl.kl_coef)
    if kl.controller == "proportional":
        return AdaptiveKLController(kl.kl_coef, kl.target, kl.horizon)
    return PIKLController(
        kl.kl_coef, kl.target, kl.p_gain, kl.i_gain, kl.lookahead, kl.smoothing, kl.min_coef, kl.max_coef
    )


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
