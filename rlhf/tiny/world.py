"""Writing the tiny world: disjoint prompt slices, then every stage's JSONL data, the tokenizer and world.json.

Everything is a deterministic function of the seed: each file draws from its own ``random.Random`` seeded with
``tiny-world/{seed}/{name}``, so the same seed gives byte-identical files and changing one file's size does not
change the others.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.tiny.demonstrators import Flaws, compose, ranked_responses, respond
from rlhf.tiny.grammar import ALL_PROMPTS, PROMPT_ATTRS, PROMPT_TEMPLATE, ROLE_TOKENS, parse_prompt, random_attrs
from rlhf.tiny.judge import JUDGE_WEIGHTS, gold_judge
from rlhf.tiny.tokenizer import build_model_config, build_tokenizer

# Held-out slices of the prompt space: (no-place prompts, prompts with a place), stratified so that every slice
# has some no-place prompts.
HELD_OUT_SLICES = (("eval", 16, 112), ("comparisons_eval", 24, 276), ("sft_eval", 16, 184))


class _PromptSampler:
    """Draws training prompts: cycles through shuffled copies of each sub-pool (even coverage), and over-samples
    no-place prompts, which are only 1/16 of the prompt space but deserve a real share of the training signal."""

    def __init__(self, rng: random.Random, no_place: list[str], with_place: list[str], p_no_place: float = 0.2):
        self.rng, self.p_no_place = rng, p_no_place
        self.pools = {True: list(no_place), False: list(with_place)}
        self.queues: dict[bool, list[str]] = {True: [], False: []}

    def draw(self) -> str:
        key = self.rng.random() < self.p_no_place
        if not self.queues[key]:
            self.queues[key] = list(self.pools[key])
            self.rng.shuffle(self.queues[key])
        return self.queues[key].pop()


@dataclass
class _World:
    """One seed's world being written: its RNGs, prompt slices, and what world.json records of the files."""

    out: Path
    seed: int
    held_out_slices: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    train_no_place: list[str] = field(default_factory=list)
    train_with_place: list[str] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

    def rng(self, name: str) -> random.Random:
        # str seeds are hashed with sha512 by random.seed, hence stable across processes (unlike hash()).
        return random.Random(f"tiny-world/{self.seed}/{name}")

    def split_prompts(self) -> None:
        """Shuffle the prompt space and cut it into the held-out slices and the training pool."""
        split_rng = self.rng("split")
        no_place = [p for p in ALL_PROMPTS if PROMPT_ATTRS[p]["place"] is None]
        with_place = [p for p in ALL_PROMPTS if PROMPT_ATTRS[p]["place"] is not None]
        split_rng.shuffle(no_place)
        split_rng.shuffle(with_place)
        for name, n_none, n_place in HELD_OUT_SLICES:
            self.held_out_slices[name] = (no_place[:n_none], with_place[:n_place])
            no_place, with_place = no_place[n_none:], with_place[n_place:]
        self.train_no_place, self.train_with_place = no_place, with_place

    def held_out(self, name: str) -> list[str]:
        prompts = self.held_out_slices[name][0] + self.held_out_slices[name][1]
        self.rng(f"{name}-order").shuffle(prompts)
        return prompts

    def sampler(self, name: str) -> _PromptSampler:
        return _PromptSampler(self.rng(f"{name}-prompts"), self.train_no_place, self.train_with_place)

    def write(self, name: str, rows: list[dict]) -> None:
        self.paths[name] = self.out / "data" / f"{name}.jsonl"
        self.counts[name] = len(rows)
        _write_jsonl(self.paths[name], rows)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def _pretrain_docs(rng: random.Random, prompts: _PromptSampler, n: int, exclude: set[str]) -> list[str]:
    docs: list[str] = []
    while len(docs) < n:
        attrs = random_attrs(rng)
        if rng.random() < 0.5:
            doc = PROMPT_TEMPLATE.format(prompt=prompts.draw()) + " " + compose(rng, attrs, Flaws())
        else:
            # A coherent paragraph: 2-3 sentences about one subject, mood and place. Like real text, it rewards
            # copying what came before, which is the skill instruction following and reward modelling build on.
            doc = " ".join(compose(rng, attrs, Flaws()) for _ in range(rng.randint(2, 3)))
        if doc not in exclude:
            docs.append(doc)
    return docs


def _write_pretrain(world: _World) -> None:
    pretrain = _pretrain_docs(world.rng("pretrain"), world.sampler("pretrain"), 6000, set())
    pretrain_eval = _pretrain_docs(world.rng("pretrain_eval"), world.sampler("pretrain_eval"), 300, set(pretrain))
    world.write("pretrain", [{"text": t} for t in pretrain])
    world.write("pretrain_eval", [{"text": t} for t in pretrain_eval])
    # Gold score of the pretraining chat docs: what a base model that only learned the format would get.
    chat = [t for t in pretrain if t.startswith(ROLE_TOKENS[0])]
    base_scores = []
    for doc in chat:
        prompt, response = doc[len("Human: ") :].split(" Assistant: ")
        base_scores.append(gold_judge(prompt, response))
    world.scores["pretrain_chat"] = _mean(base_scores)


def _write_demonstrations(world: _World, name: str, prompts: list[str]) -> None:
    rng = world.rng(name)
    rows = [{"prompt": p, "completion": respond(rng, parse_prompt(p), "noisy")} for p in prompts]
    world.write(name, rows)
    world.scores[name] = _mean([gold_judge(r["prompt"], r["completion"]) for r in rows])


def _write_comparisons(world: _World, name: str, prompts: list[str], noise: float) -> None:
    rng = world.rng(name)
    rows, best, worst, swapped = [], [], [], 0
    for prompt in prompts:
        ranked, gold = ranked_responses(rng, prompt, k=4, min_gap=0.05)
        best.append(gold[0])
        worst.append(gold[-1])
        if noise > 0 and rng.random() < noise:
            i = rng.randrange(len(ranked) - 1)
            ranked[i], ranked[i + 1] = ranked[i + 1], ranked[i]
            swapped += 1
        rows.append({"prompt": prompt, "ranked": ranked})
    world.write(name, rows)
    world.scores[f"{name}_best"] = _mean(best)
    world.scores[f"{name}_worst"] = _mean(worst)
    world.counts[f"{name}_label_noise_swaps"] = swapped


def build_tiny_world(out_dir: str | Path, seed: int = 0, *, label_noise: float = 0.1) -> dict[str, Path]:
    """Write the tiny world under ``out_dir`` and return ``{name: path}``.

    Files (prompts are raw, completions/responses raw text without EOS)::

        tokenizer/                   word-level HF tokenizer (see build_tokenizer)
        model_config/config.json     tiny LlamaConfig
        data/pretrain.jsonl          {"text"} 6000 docs: half "Human: p Assistant: r" with r well-formed but for
                                     random attributes (teaches the format, not instruction following), half
                                     paragraphs of 2-3 sentences about one subject, mood and place
        data/pretrain_eval.jsonl     {"text"} 300 held-out docs of the same distribution (no doc shared)
        data/sft.jsonl               {"prompt", "completion"} 3000 demonstrations by the noisy demonstrator
        data/sft_eval.jsonl          {"prompt", "completion"} 200 demonstrations on a held-out prompt slice
        data/comparisons.jsonl       {"prompt", "ranked"} 2500 prompts, 4 responses best..worst by the gold judge,
                                     consecutive gold scores >= 0.05 apart; with prob. ``label_noise`` one random
                                     adjacent pair is swapped
        data/comparisons_eval.jsonl  300 held-out prompts, gold ordering (no label noise)
        data/prompts.jsonl           {"prompt"} 1000 PPO training prompts
        data/eval_prompts.jsonl      {"prompt"} 128 held-out prompts, disjoint from every other file's prompts
        world.json                   seed, label_noise, counts, mean gold scores

    The prompt space is shuffled and cut into disjoint slices: eval prompts, comparisons_eval, sft_eval and the
    training pool (pretrain, sft, comparisons, PPO prompts). Each file uses its own RNG derived from ``seed`` so
    that changing one file's size does not change the others.
    """
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    world = _World(Path(out_dir), seed)
    (world.out / "data").mkdir(parents=True, exist_ok=True)
    world.split_prompts()

    _write_pretrain(world)
    sft_sampler = world.sampler("sft")
    _write_demonstrations(world, "sft", [sft_sampler.draw() for _ in range(3000)])
    _write_demonstrations(world, "sft_eval", world.held_out("sft_eval"))
    comparisons_sampler = world.sampler("comparisons")
    _write_comparisons(world, "comparisons", [comparisons_sampler.draw() for _ in range(2500)], label_noise)
    _write_comparisons(world, "comparisons_eval", world.held_out("comparisons_eval"), 0.0)
    ppo_sampler = world.sampler("ppo")
    world.write("prompts", [{"prompt": ppo_sampler.draw()} for _ in range(1000)])
    world.write("eval_prompts", [{"prompt": p} for p in world.held_out("eval")])

    tokenizer = build_tokenizer(world.out / "tokenizer")
    build_model_config(world.out / "model_config", tokenizer)
    world.paths["tokenizer"] = world.out / "tokenizer"
    world.paths["model_config"] = world.out / "model_config"

    summary = {
        "seed": seed,
        "label_noise": label_noise,
        "counts": world.counts,
        "mean_gold_score": world.scores,
        "vocab_size": len(tokenizer),
        "judge_weights": JUDGE_WEIGHTS,
        "prompt_space": len(ALL_PROMPTS),
    }
    world.paths["world"] = world.out / "world.json"
    with open(world.paths["world"], "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(summary, sort_keys=True, indent=2) + "\n")
    return world.paths
