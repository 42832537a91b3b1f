"""Verifiable rewards: GSM8K-style answer extraction by hand, the reference column reaching reward functions and
judges, and PPO scoring with a reference-checking reward function."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
from conftest import ppo_config, read_metrics, tiny_llama_config

from rlhf.rewards import final_number, gsm8k_exact_match, row_function
from rlhf.stages import ppo


@pytest.mark.parametrize(
    "text, number",
    [
        ("She sells 16 - 3 - 4 = 9 eggs.\n#### 9", 9),
        ("#### 1,234", 1234),
        ("The answer is $18.", 18),
        ("72 apples in all", 72),
        ("it costs 3.50 dollars", Fraction(7, 2)),
        ("#### 5\nThat is 7 more than before", 5),  # the number after the marker, not trailing words
        ("-4 degrees", -4),
        ("half of it: 7/2", Fraction(7, 2)),
        ("12% of 50 is 6.", 6),  # the last number when there is no marker
        ("no number here", None),
    ],
)
def test_final_number(text, number):
    assert final_number(text) == number


def test_gsm8k_exact_match():
    reference = "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72"
    assert gsm8k_exact_match("q", "48 + 24 = 72, so 72 clips.", reference) == 1.0
    assert gsm8k_exact_match("q", "#### 72.0", reference) == 1.0
    assert gsm8k_exact_match("q", "She sold 70 clips.", reference) == 0.0
    assert gsm8k_exact_match("q", "I don't know.", reference) == 0.0
    assert gsm8k_exact_match("q", "#### 3", "no gold answer") == 0.0


def two_args(prompt, response):
    return len(response)


def three_args(prompt, response, reference):
    return float(reference == response)


def test_row_function_passes_the_reference_to_functions_that_take_it():
    row = {"prompt": "p", "messages": [], "reference": "42"}
    assert row_function("test_rewards:two_args", "reward.function")(row, "abc") == 3.0
    assert row_function("test_rewards:three_args", "reward.function")(row, "42") == 1.0
    assert row_function("test_rewards:three_args", "reward.function")(row, "41") == 0.0


SEEN: list[str] = []


def reference_length(prompt, response, reference):
    """A verifiable reward on the tiny world: 1 when the response has as many words as the reference says."""
    SEEN.append(reference)
    return float(len(response.split()) == int(reference))


def test_ppo_scores_with_the_reference_of_each_prompt_row(tiny_world, tiny_sft, tiny_rm, tmp_path):
    rows = [json.loads(line) for line in (tiny_world / "data" / "prompts.jsonl").read_text().splitlines()[:64]]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": r["prompt"], "answer": "5"}) + "\n" for r in rows))
    SEEN.clear()
    cfg = ppo_config(
        tiny_world,
        tiny_sft,
        tiny_rm,
        tmp_path / "out",
        [
            f"data.prompts.path={prompts}",
            "data.prompts.field_map={prompt: question, reference: answer}",
            "models.reward.name_or_path=",
            "reward.function=test_rewards:reference_length",
            "ppo.advantage=rloo",
            "rollout.samples_per_prompt=2",
            "models.value_init=policy",
            "train.max_steps=2",
        ],
    )
    ppo.train(cfg)
    assert SEEN and set(SEEN) == {"5"}  # every episode was scored against its row's reference
    scores = [r["objective/scores"] for r in read_metrics(tmp_path / "out") if "objective/scores" in r]
    assert scores and all(-1.0 <= s <= 1.0 for s in scores)  # 0/1, or the missing-EOS penalty -1


def gsm8k_stand_in(root):
    """GSM8K's layout ({question, answer ending "#### N"}) with small sums, a word-level tokenizer over its words
    and a random tiny Llama: what the verifiable-reward recipe reads, built locally."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["Human:", "Assistant:", "what", "is", "plus", "?", ".", "####"] + [str(n) for n in range(21)]
    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", "<s>", "</s>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = tiny_llama_config(len(vocab), 1, max_position_embeddings=64, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    rng = random.Random(0)
    for split, n in (("train", 96), ("test", 16)):
        rows = []
        for _ in range(n):
            a, b = rng.randint(0, 10), rng.randint(0, 10)
            rows.append({"question": f"what is {a} plus {b} ?", "answer": f"{a} plus {b} is {a + b} . #### {a + b}"})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_the_verifiable_reward_recipe_raises_accuracy_on_a_stand_in(tmp_path):
    """configs/qwen2.5-0.5b-gsm8k (SFT on worked solutions -> RLOO against the exact-match checker -> accuracy)
    with overrides that change only locations and sizes (and a tiny model's learning rates)."""
    from conftest import CONFIGS

    from rlhf.config import load_config
    from rlhf.stages import evaluate, sft

    s = gsm8k_stand_in(tmp_path)
    recipe = CONFIGS / "qwen2.5-0.5b-gsm8k"
    fmt = ["data.format.max_length=48", "data.format.max_prompt_length=24", "data.format.use_chat_template=never"]
    quiet = ["logging.progress=off", "logging.tensorboard=false", "train.mixed_precision=no"]
    sft_final = sft.train(
        load_config(
            "sft",
            recipe / "sft.yaml",
            quiet
            + fmt
            + [
                f"output_dir={tmp_path / 'sft'}",
                f"model.name_or_path={s / 'base'}",
                "model.gradient_checkpointing=false",
                f"data.train.path={s / 'train.jsonl'}",
                f"data.eval.path={s / 'test.jsonl'}",
                "train.max_steps=150",
                "train.batch_size=16",
                "train.micro_batch_size=16",
                "train.eval_every=0",
                "optim.lr=3e-3",
                "optim.warmup_steps=0",
            ],
        )  # fmt: skip
    )
    ppo_final = ppo.train(
        load_config(
            "ppo",
            recipe / "ppo.yaml",
            quiet
            + fmt
            + [
                f"output_dir={tmp_path / 'ppo'}",
                f"models.policy.name_or_path={sft_final}",
                "models.policy.gradient_checkpointing=false",
                f"data.prompts.path={s / 'train.jsonl'}",
                f"data.eval_prompts.path={s / 'test.jsonl'}",
                "rollout.max_new_tokens=12",
                "rollout.generation_batch_size=64",
                "train.max_steps=40",
                "train.batch_size=64",
                "ppo.mini_batch_size=32",
                "ppo.micro_batch_size=32",
                "optim.warmup_steps=1",
                "optim.lr=5e-4",
                "train.eval_every=0",
                "checkpoint.every=0",
            ],
        )  # fmt: skip
    )
    result = evaluate.run(
        load_config(
            "eval",
            recipe / "eval.yaml",
            [
                f"output_dir={tmp_path / 'eval'}",
                f"policy={ppo_final}",
                f"sft={sft_final}",
                f"prompts.path={s / 'test.jsonl'}",
                "num_prompts=16",
                "max_new_tokens=12",
                "batch_size=64",
                "format.max_length=48",
                "format.max_prompt_length=24",
                "format.use_chat_template=never",
            ],
        )  # fmt: skip
    )
    for model in ("sft", "policy"):  # pass@1 and pass@4 from the 0/1 checker
        assert 0.0 <= result[f"gold_score_{model}"] <= result[f"gold_pass_at_k_{model}"] <= 1.0
    # RL against the checker raises held-out accuracy (docs/benchmarks.md has the numbers)
    print("verifiable reward stand-in:", {k: v for k, v in result.items() if k.startswith("gold")})
    assert result["gold_score_policy"] > result["gold_score_sft"], result
    rewards = [r["objective/scores"] for r in read_metrics(tmp_path / "ppo") if "objective/scores" in r]
    assert len(rewards) == 40 and sum(rewards[-10:]) > sum(rewards[:10])
