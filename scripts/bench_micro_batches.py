"""How much of PPO's training forwards is padding, by how a minibatch's episodes are grouped into micro-batches.

A micro-batch of episodes laid out as [left-padded prompt | response], cut to its real columns, is as wide as its
longest prompt plus its longest response. This prints the share of real tokens among the cells computed, averaged
over random minibatches, for the order by response length alone (the simpler rule),
`aligned_batches`, and no order at all, on length distributions stated below (log-normal: median, sigma, clipped).

    python scripts/bench_micro_batches.py [--trials 300] [--seed 0]
"""

import argparse
import math
import random
import statistics

from rlhf.data.batching import aligned_batches

# name: (prompt length: median, sigma, min, max), (response length: ...), minibatch, micro-batch
WORKLOADS = {
    "chat (HH-like: prompts up to 512, responses up to 256), 64 in 8s": ((120, 0.8, 8, 512), (80, 0.7, 4, 256), 64, 8),
    "chat, 32 in 4s": ((120, 0.8, 8, 512), (80, 0.7, 4, 256), 32, 4),
    "math (GSM8K-like: prompts up to 256, responses up to 384), 64 in 8s": (
        (100, 0.3, 20, 256),
        (150, 0.5, 10, 384),
        64,
        8,
    ),
    "prompts of one length, responses vary, 64 in 8s": ((40, 0.0, 40, 40), (80, 0.7, 4, 256), 64, 8),
    "bench-peer ppovar (prompts up to 32, 32 new tokens), 8 in 2s": ((16, 0.7, 4, 32), (32, 0.0, 32, 32), 8, 2),
}


def cells(batches: list[list[int]], prompts: list[int], responses: list[int]) -> int:
    return sum(len(b) * (max(prompts[i] for i in b) + max(responses[i] for i in b)) for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    def draw(median, sigma, lo, hi):
        return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))

    print("| lengths, minibatch in micro-batches | no order | by response length | aligned_batches |")
    print("|---|---|---|---|")
    for name, (p, r, n, size) in WORKLOADS.items():
        shares = {"none": [], "response": [], "aligned": []}
        for _ in range(args.trials):
            prompts, responses = [draw(*p) for _ in range(n)], [draw(*r) for _ in range(n)]
            real = sum(prompts) + sum(responses)
            by_response = sorted(range(n), key=lambda i: (responses[i], i))
            orders = {
                "none": [list(range(n))[s : s + size] for s in range(0, n, size)],
                "response": [by_response[s : s + size] for s in range(0, n, size)],
                "aligned": aligned_batches(prompts, responses, size),
            }
            for key, batches in orders.items():
                shares[key].append(real / cells(batches, prompts, responses))
        mean = {k: statistics.mean(v) for k, v in shares.items()}
        print(f"| {name} | {mean['none']:.0%} | {mean['response']:.0%} | **{mean['aligned']:.0%}** |")


if __name__ == "__main__":
    main()
