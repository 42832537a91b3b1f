"""What `rollout.share_prompt` saves: one group's prompt run once, its k responses on the prompt's KV cache, against
every sequence run whole, in PPO's generation (`--phase generate`), its scoring forwards (`--phase score`) or, with
ppo.group_minibatches, in the update's differentiated ones (`--phase train`); and DPO's `share_prompt` (`--phase
dpo`: k = 2 for chosen/rejected pairs, 4 for ranked lists; per micro-batch of 16 responses the policy's forward and
backward and a reference copy's forward, as `rlhf.stages.dpo.preference_loss` runs them, against DPO's own padded
batches), and the reward model's (`--phase rm`: the same groups, the scalar-head model's forward and backward as
`rlhf.stages.reward_model.group_loss` runs them).

For each (prompt length, k): 64 episodes (64/k prompts x k responses). generate: 64 new tokens sampled per episode
(each with its own seed; a random-init model seldom ends early), the prompts prefilled whole or each distinct prompt
once (`shared_prefill`). score: the policy's log-probs and a reward model's scores, no gradients. train: in
micro-batches of 16 episodes (whole groups), the policy's log-probs and entropies and a critic's values, forward and
backward. Timed both ways (median of --reps after one warm-up), on
bench-peer's tiny Llama shape (d 256, 4 layers, vocabulary 568) or --size small (d 512, 8 layers); fp32 on CPU,
bf16 autocast on a GPU. Prompt lengths vary around the stated width (log-normal, sigma 0.5, left-padded),
responses are 64 tokens at most (log-normal, right-padded).

    python scripts/bench_shared_prompt.py [--phase generate|score|train|dpo|rm] [--size tiny|small] [--reps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf.data.batching import pad
from rlhf.generation.sampling import generate
from rlhf.models.forwards import response_logprobs
from rlhf.models.heads import TokenValueModel, reward_scores
from rlhf.models.shared_prompt import (
    logprobs_forward,
    prompt_groups,
    shared_prefill,
    shared_response_logprobs,
    shared_reward_scores,
    values_forward,
)
from rlhf.stages import dpo
from rlhf.stages import reward_model as reward

SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
}
VOCAB, EPISODES, RESPONSE, MICRO = 568, 64, 64, 16


def lengths(n: int, median: float, cap: int, g: torch.Generator) -> list[int]:
    drawn = torch.exp(torch.randn(n, generator=g) * 0.5) * median
    return [int(x) for x in drawn.round().clamp(1, cap)]


def episodes(prompt_width: int, k: int, g: torch.Generator):
    prompts = [
        torch.randint(3, VOCAB, (n,), generator=g).tolist()
        for n in lengths(EPISODES // k, prompt_width, 2 * prompt_width, g)
    ]
    rows = [j for j in range(len(prompts)) for _ in range(k)]
    responses = [
        torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths(EPISODES, RESPONSE / 2, RESPONSE, g)
    ]
    P = max(len(p) for p in prompts)
    qr = torch.cat([pad([prompts[j] for j in rows], 0, side="left", width=P), pad(responses, 0)], 1)
    am = torch.cat(
        [
            pad([[1] * len(prompts[j]) for j in rows], 0, side="left", width=P),
            pad([[1] * len(r) for r in responses], 0),
        ],
        1,
    )
    return qr, am, P, rows


def full(policy, rm, qr, am, P) -> None:
    response_logprobs(policy, qr, am, P, 1.0)
    reward_scores(rm, qr, am)


def shared(policy, rm, qr, am, P, groups) -> None:
    shared_response_logprobs(policy, qr, am, P, 1.0, groups)
    shared_reward_scores(rm, qr, am, P, groups)


def sample(policy, qr, am, P, prefill) -> None:
    """Every episode's response sampled from its prompt (left padding stripped), with its own seed."""
    prompts = [row[mask.bool()].tolist() for row, mask in zip(qr[:, :P], am[:, :P])]
    tokens = SimpleNamespace(pad_token_id=0, eos_token_id=2)  # what generate reads of a tokenizer
    generate(policy, tokens, prompts, RESPONSE, 1.0, seeds=list(range(len(prompts))), prefill=prefill)


def train_step(policy, critic, qr, am, P, k: int, share: bool) -> None:
    """The update's forwards and backwards over the episodes (a group's k consecutive), in micro-batches of MICRO
    (gradients accumulate)."""
    for s in range(0, qr.shape[0], MICRO):
        ids, mask = qr[s : s + MICRO], am[s : s + MICRO]
        groups = prompt_groups([i // k for i in range(s, s + MICRO)], ids.device) if share else None
        logprobs, entropy = logprobs_forward(groups)(policy, ids, mask, P, 1.0, entropy=True)
        values = values_forward(groups)(critic, ids, mask, P)
        (logprobs.sum() + entropy.sum() + values.sum()).backward()
    policy.zero_grad(set_to_none=True)
    critic.zero_grad(set_to_none=True)


def dpo_step(policy, reference, groups: list, share: bool) -> None:
    """DPO's loss over the groups in micro-batches of MICRO responses, forward and backward (gradients accumulate)."""
    per_micro = max(1, MICRO // len(groups[0]))
    for s in range(0, len(groups), per_micro):
        batch = dpo.collate_groups(groups[s : s + per_micro], 0, share_prompt=share)
        batch = {key: value.to(policy.device) for key, value in batch.items()}
        loss, _ = dpo.preference_loss(policy, lambda m, b: dpo.sequence_logps(reference, b), batch, 0.1, 0.0)
        loss.backward()
    policy.zero_grad(set_to_none=True)


def rm_step(scorer, groups: list, share: bool) -> None:
    """The RM's loss over the groups in micro-batches of MICRO responses, forward and backward."""
    per_micro = max(1, MICRO // len(groups[0]))
    for s in range(0, len(groups), per_micro):
        chunk = groups[s : s + per_micro]
        if share:
            batch = reward.collate_shared_prompt(chunk, 0, 0.0)
        else:
            batch = reward.collate_groups([[p + r for p, r in group] for group in chunk], 0, 0.0)
        batch = {key: value.to(next(scorer.parameters()).device) for key, value in batch.items()}
        reward.group_loss(scorer, batch)[0].backward()
    scorer.zero_grad(set_to_none=True)


def timed_pair(full_fn, shared_fn, reps: int) -> tuple[float, float]:
    """Median seconds of each function, the two alternating (one warm-up each), so drift touches both alike."""
    times: tuple[list, list] = ([], [])
    for rep in range(reps + 1):
        for fn, out in zip((full_fn, shared_fn), times):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if rep:
                out.append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=("generate", "score", "train", "dpo", "rm"), default="score")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, pad_token_id=0, max_position_embeddings=1024, **SIZES[args.size])
    policy = LlamaForCausalLM(LlamaConfig(**shape)).to(device)
    scalar = LlamaForSequenceClassification(LlamaConfig(**shape, num_labels=1)).to(device)
    train = args.phase in ("train", "dpo", "rm")
    policy.train(train)
    reference = LlamaForCausalLM(LlamaConfig(**shape)).to(device).eval() if args.phase == "dpo" else None
    critic = TokenValueModel(scalar).train() if train else None  # trained: the critic; else the reward model
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    g = torch.Generator().manual_seed(0)
    for prompt_width in (32, 128, 256):
        for k in (2, 4) if args.phase in ("dpo", "rm") else (1, 4, 8):
            qr, am, P, rows = episodes(prompt_width, k, g)
            qr, am = qr.to(device), am.to(device)
            groups = prompt_groups(rows, device)

            if args.phase in ("dpo", "rm"):  # the same prompts and responses as groups of k, unpadded
                unpadded = [
                    (row[:P][mask[:P].bool()].tolist(), row[P:][mask[P:].bool()].tolist())
                    for row, mask in zip(qr.cpu(), am.cpu())
                ]
                ranked = [unpadded[s : s + k] for s in range(0, len(unpadded), k)]
                if args.phase == "dpo":
                    fns = [functools.partial(dpo_step, policy, reference, ranked, s) for s in (False, True)]
                else:
                    fns = [functools.partial(rm_step, critic, ranked, s) for s in (False, True)]
            elif args.phase == "generate":  # the k = 1 rows time the detection that finds nothing to share
                fns = [functools.partial(sample, policy, qr, am, P, prefill) for prefill in (None, shared_prefill)]
            elif train:
                fns = [functools.partial(train_step, policy, critic, qr, am, P, k, share) for share in (False, True)]
            else:
                fns = [functools.partial(full, policy, scalar, qr, am, P)]
                fns.append(functools.partial(shared, policy, scalar, qr, am, P, groups) if groups else fns[0])
            with autocast, torch.set_grad_enabled(train):
                t_full, t_shared = timed_pair(*fns, args.reps)
            real = int(am.sum())
            print(
                json.dumps(
                    {
                        "phase": args.phase,
                        "size": args.size,
                        "device": device,
                        "prompt_median": prompt_width,
                        "k": k,
                        "prompt_tokens_share": round(int(am[:, :P].sum()) / real, 3),
                        "full_s": round(t_full, 4),
                        "shared_s": round(t_shared, 4),
                        "speedup": round(t_full / t_shared, 2),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
