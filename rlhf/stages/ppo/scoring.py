"""What a response scores: the reward model(s) and/or the reward function on a batch of episodes (`Scorer`, used by
the rollout's scoring), and the policy's mean score on the held-out prompts (`held_out_scores`)."""

from __future__ import annotations

import functools
import math

import torch

from rlhf.algorithms import aggregate_ensemble, truncate_after_eos
from rlhf.config import ConfigError, PPOConfig
from rlhf.data.batching import pad
from rlhf.data.encoding import response_sequences
from rlhf.generation.sampling import decode_responses, episode_seed, generate
from rlhf.models.heads import reward_scores
from rlhf.models.shared_prompt import PromptGroups, shared_reward_scores
from rlhf.runtime.accelerator import generation_context
from rlhf.stages.ppo.roles import RewardSources
from rlhf.stages.ppo.rollout import EVAL_STREAM


class Scorer:
    """The reward of an episode: `reward.aggregate` of the reward models' scores and/or `reward.function`."""

    def __init__(self, cfg: PPOConfig, tokenizer, rewards: RewardSources):
        """`tokenizer`: the policy's, which wrote the sequences scored."""
        self.cfg, self.tokenizer, self.rewards = cfg, tokenizer, rewards

    def score(
        self,
        query_responses,
        attention_mask,
        prompt_width: int,
        rows: list[dict],
        where: list[str],
        groups: PromptGroups | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [B] of (prompt + response) sequences [B,P+R], and the reward-model ensemble's std [B].

        The reward model's normalised score is read at the last real token (EOS); with an ensemble it is
        `reward.aggregate` of the members' scores (one member: its score, std 0). With a different RM tokenizer the
        raw prompt is rendered for the RM exactly as in RM training and the decoded response appended, then
        re-tokenized (TRL and OpenRLHF refuse this case). `reward.function` scores the raw prompt and the decoded
        response; with both, the score is model_weight * RM + function_weight * function. `where` names each row
        for error messages; `groups`: which episodes share a prompt (run once when the RM reads the same tokens).
        """
        zeros = torch.zeros(query_responses.shape[0], device=query_responses.device)
        scores, score_std = zeros, zeros
        r, sources = self.cfg.reward, self.rewards
        if sources.models:
            ids, mask = query_responses, attention_mask
            if not sources.same_tokenizer:
                rtok = sources.tokenizer
                responses = query_responses[:, prompt_width:]
                ended = (responses == self.tokenizer.eos_token_id).any(-1).tolist()
                texts = decode_responses(self.tokenizer, responses)
                seqs = response_sequences(rtok, self.cfg.data.format, rows, texts, ended)
                ids = pad(seqs, rtok.pad_token_id).to(query_responses.device)
                mask = pad([[1] * len(s) for s in seqs], 0).to(query_responses.device)
            member = reward_scores
            if groups is not None and sources.same_tokenizer:
                member = functools.partial(shared_reward_scores, prompt_width=prompt_width, groups=groups)
            member_scores = torch.stack([member(rm, ids, mask) for rm in sources.models])
            scores, score_std = aggregate_ensemble(member_scores, r.aggregate, r.std_coef)
            if sources.function is None:
                return scores, score_std
            scores, score_std = r.model_weight * scores, r.model_weight * score_std
        texts = decode_responses(self.tokenizer, query_responses[:, prompt_width:])
        values = []
        for row, text, label in zip(rows, texts, where):
            try:
                values.append(sources.function(row, text))
            except Exception as e:  # a user's function: say which row broke it, and that nothing is lost
                raise ConfigError(
                    f"reward.function {r.function} failed on {label} (prompt {row['prompt'][:80]!r}, response "
                    f"{text[:80]!r}): {type(e).__name__}: {e}. The last checkpoint, if any, is intact"
                ) from e
        return scores + r.function_weight * torch.tensor(values, device=scores.device), score_std


@torch.no_grad()
def held_out_scores(
    cfg: PPOConfig, acc, policy, eval_rows: list[dict], eval_ids: list[list[int]], scorer: Scorer
) -> dict:
    """Mean score and EOS share of the policy's samples on the held-out prompts (eval/rm_score, eval/eos_share)."""
    tokenizer = scorer.tokenizer
    # each held-out prompt has its own sampling stream: the training's random state is untouched, and the
    # samples are the same on any number of processes
    n, ids = len(eval_ids), eval_ids
    # chunks of like prompt length (less left padding); a sum over prompts, each with its own seed: order is free
    positions = sorted(range(acc.process_index, n, acc.num_processes), key=lambda i: (-len(ids[i]), i))
    counted = [1.0] * len(positions)
    share = math.ceil(n / acc.num_processes)  # equal chunk counts everywhere: sharded forwards are collective
    positions, counted = positions + [n - 1] * (share - len(positions)), counted + [0.0] * (share - len(counted))
    totals = torch.zeros(3, dtype=torch.float64, device=acc.device)  # sum of scores, of EOS endings, count
    gen_batch = cfg.rollout.generation_batch_size
    with generation_context(acc, policy) as (generator_model, synced), acc.autocast():
        for s in range(0, len(positions), gen_batch):
            chunk = positions[s : s + gen_batch]
            prompt_ids, prompt_mask, resp = generate(
                generator_model,
                tokenizer,
                [eval_ids[i] for i in chunk],
                cfg.rollout.max_new_tokens,
                cfg.rollout.temperature,
                seeds=[episode_seed(cfg.seed, EVAL_STREAM, i) for i in chunk],
                synced=synced,
            )
            resp, mask = truncate_after_eos(resp, tokenizer.eos_token_id, tokenizer.pad_token_id)
            qr = torch.cat([prompt_ids, resp], 1)
            am = torch.cat([prompt_mask, mask.long()], 1)
            where = [f"eval prompt row {i} of {cfg.data.eval_prompts.path}" for i in chunk]
            scores = scorer.score(qr, am, prompt_ids.shape[1], [eval_rows[i] for i in chunk], where)[0]
            ended = (resp == tokenizer.eos_token_id).any(-1)
            weight = torch.tensor(counted[s : s + gen_batch], device=acc.device, dtype=torch.float64)
            totals += torch.stack([(scores * weight).sum(), (ended * weight).sum(), weight.sum()])
    score_sum, eos_sum, count = acc.reduce(totals, "sum").tolist()
    return {"eval/rm_score": score_sum / count, "eval/eos_share": eos_sum / count}
