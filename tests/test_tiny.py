"""Tests of the tiny world: gold judge rules, tokenizer, determinism, data splits and model config."""

import json
import random
import time

import pytest

from rlhf.tiny import (
    ALL_PROMPTS,
    JUDGE_WEIGHTS,
    PROMPT_TEMPLATE,
    SPECIAL_TOKENS,
    VOCAB,
    Flaws,
    build_tiny_world,
    compose,
    gold_judge,
    judge_breakdown,
    parse_prompt,
)

SHORT_CAT = "tell me a short happy sentence about the cat ."
SHORT_CAT_PARK = "write a short happy sentence about the cat in the park ."
LONG_CAT_PARK = "write a long happy sentence about the cat in the park ."
LONG_CAT = "give me a long happy line about the cat ."


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world0")
    start = time.perf_counter()
    paths = build_tiny_world(out, seed=0)
    return {"paths": paths, "out": out, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------------------
# Gold judge
# ---------------------------------------------------------------------------------------------------------------


def test_weights_sum_to_one():
    assert sum(JUDGE_WEIGHTS.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "prompt, response",
    [
        (SHORT_CAT, "the cat is happy today ."),
        (SHORT_CAT_PARK, "the cat is happy in the park ."),
        (LONG_CAT_PARK, "the cat is happy in the park and it plays all day ."),
        (LONG_CAT, "the cat is glad and it smiles and it plays all day ."),
        (LONG_CAT, "the cat is glad and it smiles near the river all day ."),  # one place is fine when none asked
        (SHORT_CAT, "the cat is happy it is it is ."),  # the/and/a/it/is may repeat
    ],
)
def test_perfect_response_scores_one(prompt, response):
    assert gold_judge(prompt, response) == 1.0
    assert set(judge_breakdown(prompt, response)) == set(JUDGE_WEIGHTS)


@pytest.mark.parametrize(
    "prompt, response, criterion, loss",
    [
        # subject: missing -> full weight; other animal too -> half
        (SHORT_CAT, "the dog is happy today .", "subject", 0.3),
        (SHORT_CAT, "it is happy today .", "subject", 0.3),
        (SHORT_CAT, "the cat is happy with the dog .", "subject", 0.15),
        # mood: mixed -> half; only the wrong mood or no mood word -> full weight
        (SHORT_CAT, "the cat is happy but it cries .", "mood", 0.15),
        (SHORT_CAT, "the cat is sad today .", "mood", 0.3),
        (SHORT_CAT, "the cat is little today .", "mood", 0.3),
        # length: 0.05 per word outside the range, floored at 0
        (SHORT_CAT, "the cat is happy and it plays all day .", "length", 0.05),
        (SHORT_CAT, "the cat is happy and it plays with a little friend .", "length", 0.15),
        (SHORT_CAT, "the cat is happy and it plays with a little friend all day now .", "length", 0.2),
        (LONG_CAT, "the cat is glad and it smiles today .", "length", 0.1),
        # place asked: forgotten -> full weight; other place too -> half
        (SHORT_CAT_PARK, "the cat is happy today .", "place", 0.1),
        (SHORT_CAT_PARK, "the cat is happy in the garden .", "place", 0.1),
        (LONG_CAT_PARK, "the cat is happy in the park and it plays near the river .", "place", 0.05),
        # no place asked: more than one place word -> full weight
        (LONG_CAT, "the cat is happy in the park and in the garden .", "place", 0.1),
        (LONG_CAT, "the cat is happy in the park and it plays in the park .", "place", 0.1),
        # ending: half for the final ".", half for no rambling repetition
        (SHORT_CAT, "the cat is happy today", "ending", 0.05),
        (SHORT_CAT, "the cat is happy today . .", "ending", 0.05),
        (SHORT_CAT, "the cat is happy . today .", "ending", 0.05),
        (SHORT_CAT, "the cat is happy today today today .", "ending", 0.05),
        (SHORT_CAT, "the cat is happy today today today", "ending", 0.1),
    ],
)
def test_each_violation_loses_its_documented_weight(prompt, response, criterion, loss):
    breakdown = judge_breakdown(prompt, response)
    assert gold_judge(prompt, response) == pytest.approx(1.0 - loss)
    assert breakdown[criterion] == pytest.approx(JUDGE_WEIGHTS[criterion] - loss)
    for other, value in breakdown.items():
        if other != criterion:
            assert value == pytest.approx(JUDGE_WEIGHTS[other])


@pytest.mark.parametrize("response", ["", "   ", ".", ". . ."])
def test_empty_response_scores_zero(response):
    assert gold_judge(SHORT_CAT, response) == 0.0
    assert all(v == 0.0 for v in judge_breakdown(SHORT_CAT, response).values())


def test_garbage_responses_never_raise():
    rng = random.Random(0)
    tokens = list(VOCAB) + list(SPECIAL_TOKENS) + ["zebra", "CAT", "!!", "\t", "ünïcode"]
    cases = ["zebra zebra zebra", "</s> <pad> <unk>", "Human: Assistant:", "cat cat cat cat . . . happy sad"]
    cases += [" ".join(rng.choice(tokens) for _ in range(rng.randint(1, 60))) for _ in range(500)]
    for response in cases:
        for prompt in (SHORT_CAT, LONG_CAT_PARK):
            score = gold_judge(prompt, response)
            assert 0.0 <= score <= 1.0
            assert sum(judge_breakdown(prompt, response).values()) == pytest.approx(score)


def test_parse_prompt():
    assert parse_prompt(SHORT_CAT_PARK) == {"mood": "happy", "subject": "cat", "length": "short", "place": "park"}
    assert parse_prompt("give me a long sad line about the fox at the river .")["place"] == "river"
    assert parse_prompt(LONG_CAT)["place"] is None
    assert len(ALL_PROMPTS) == len(set(ALL_PROMPTS)) == 2304


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        "write a poem about the cat .",
        "write a short happy sentence about the zebra .",
        "write a short happy sentence about the cat",  # missing "."
        PROMPT_TEMPLATE.format(prompt=SHORT_CAT),  # templated, not raw
    ],
)
def test_parse_prompt_rejects_non_grammar(prompt):
    with pytest.raises(ValueError, match="not a tiny-world prompt"):
        parse_prompt(prompt)
    with pytest.raises(ValueError):
        gold_judge(prompt, "the cat is happy today .")


def test_flawless_demonstrations_score_one():
    rng = random.Random(0)
    for prompt in rng.sample(ALL_PROMPTS, 500):
        response = compose(rng, parse_prompt(prompt), Flaws())
        assert gold_judge(prompt, response) == 1.0, response


# ---------------------------------------------------------------------------------------------------------------
# Built world
# ---------------------------------------------------------------------------------------------------------------


def test_build_writes_all_files(world):
    paths = world["paths"]
    expected = {"tokenizer", "model_config", "world", "pretrain", "pretrain_eval", "sft", "sft_eval"}
    expected |= {"comparisons", "comparisons_eval", "prompts", "eval_prompts"}
    assert set(paths) == expected
    assert all(p.exists() for p in paths.values())
    info = json.loads(paths["world"].read_text())
    assert info["seed"] == 0 and info["label_noise"] == 0.1
    for name in expected - {"tokenizer", "model_config", "world"}:
        assert info["counts"][name] == len(read_jsonl(paths[name]))
    assert world["seconds"] < 20  # the spec asks < 10 s; leave slack for slow CI machines


def test_tokenizer_loads_and_round_trips(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["paths"]["tokenizer"])
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0
    assert tok.eos_token is not None and tok.bos_token is not None and tok.unk_token is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    assert len(tok) == len(VOCAB) + len(SPECIAL_TOKENS)
    rows = read_jsonl(world["paths"]["sft"])
    texts = [PROMPT_TEMPLATE.format(prompt=r["prompt"]) + " " + r["completion"] for r in rows[:300]]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.bos_token_id not in ids and tok.eos_token_id not in ids  # nothing added on encode
        assert tok.decode(ids) == text
    ids = tok(texts[0] + " " + tok.eos_token)["input_ids"]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == texts[0]


def test_no_unknown_tokens_in_data(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["paths"]["tokenizer"])
    paths = world["paths"]
    texts = [r["text"] for name in ("pretrain", "pretrain_eval") for r in read_jsonl(paths[name])]
    for name in ("sft", "sft_eval"):
        texts += [PROMPT_TEMPLATE.format(prompt=r["prompt"]) + " " + r["completion"] for r in read_jsonl(paths[name])]
    for name in ("comparisons", "comparisons_eval"):
        for r in read_jsonl(paths[name]):
            texts += [r["prompt"], *r["ranked"]]
    for name in ("prompts", "eval_prompts"):
        texts += [PROMPT_TEMPLATE.format(prompt=r["prompt"]) for r in read_jsonl(paths[name])]
    for ids in tok(texts)["input_ids"]:
        assert tok.unk_token_id not in ids


def test_same_seed_is_byte_identical_and_other_seed_differs(world, tmp_path):
    out0 = world["out"]
    build_tiny_world(tmp_path / "again", seed=0)
    build_tiny_world(tmp_path / "seed1", seed=1)
    files = sorted(p.relative_to(out0) for p in out0.rglob("*") if p.is_file())
    assert any(str(f).startswith("tokenizer") for f in files)
    assert sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file()) == files
    for f in files:
        assert (out0 / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    for f in files:
        if f.parts[0] == "data":
            assert (out0 / f).read_bytes() != (tmp_path / "seed1" / f).read_bytes(), f


def test_jsonl_format(world):
    line = world["paths"]["sft"].read_text(encoding="utf-8").splitlines()[0]
    row = json.loads(line)
    assert line == json.dumps(row, sort_keys=True)
    assert set(row) == {"prompt", "completion"}
    assert "</s>" not in row["completion"] and not row["prompt"].startswith("Human:")


def test_eval_prompts_disjoint_from_training(world):
    paths = world["paths"]

    def prompts(name, key="prompt"):
        return {r[key] for r in read_jsonl(paths[name])}

    pretrain_prompts = set()
    for name in ("pretrain", "pretrain_eval"):
        for r in read_jsonl(paths[name]):
            if r["text"].startswith("Human: "):
                pretrain_prompts.add(r["text"][len("Human: ") :].split(" Assistant: ")[0])
    training = prompts("sft") | prompts("comparisons") | prompts("prompts") | pretrain_prompts
    held_out = prompts("eval_prompts")
    assert len(held_out) == 128
    assert not held_out & training
    assert not held_out & (prompts("sft_eval") | prompts("comparisons_eval"))
    assert not prompts("comparisons_eval") & prompts("comparisons")
    assert not prompts("sft_eval") & prompts("sft")
    assert all(p in ALL_PROMPTS for p in training | held_out)
    # every slice has some prompts without a place
    assert any(parse_prompt(p)["place"] is None for p in held_out)


def test_comparisons_are_ranked_by_gold_judge(world):
    paths = world["paths"]
    gold = read_jsonl(paths["comparisons_eval"])
    assert len(gold) == 300
    for row in gold:
        scores = [gold_judge(row["prompt"], r) for r in row["ranked"]]
        assert len(row["ranked"]) >= 4 and len(set(row["ranked"])) == len(row["ranked"])
        assert all(a - b >= 0.05 - 1e-9 for a, b in zip(scores, scores[1:]))

    noisy = read_jsonl(paths["comparisons"])
    unordered, best_wins = 0, 0
    for row in noisy:
        scores = [gold_judge(row["prompt"], r) for r in row["ranked"]]
        assert len(row["ranked"]) >= 4
        unordered += any(a < b for a, b in zip(scores, scores[1:]))
        best_wins += max(scores[:2]) > min(scores[-2:])  # a single adjacent swap cannot flip best vs worst
    assert abs(unordered / len(noisy) - 0.1) < 0.03
    assert best_wins == len(noisy)


def test_label_noise_is_configurable(tmp_path):
    paths = build_tiny_world(tmp_path, seed=3, label_noise=0.0)
    for row in read_jsonl(paths["comparisons"])[:300]:
        scores = [gold_judge(row["prompt"], r) for r in row["ranked"]]
        assert scores == sorted(scores, reverse=True)
    with pytest.raises(ValueError):
        build_tiny_world(tmp_path / "bad", label_noise=1.5)


def test_demonstration_quality(world):
    paths = world["paths"]
    sft = read_jsonl(paths["sft"])
    assert len(sft) == 3000
    mean = sum(gold_judge(r["prompt"], r["completion"]) for r in sft) / len(sft)
    assert 0.6 < mean < 0.9
    comparisons = read_jsonl(paths["comparisons_eval"])
    best = sum(gold_judge(r["prompt"], r["ranked"][0]) for r in comparisons) / len(comparisons)
    worst = sum(gold_judge(r["prompt"], r["ranked"][-1]) for r in comparisons) / len(comparisons)
    assert best > mean > worst
    # pretraining responses answer random attributes: clearly worse than the demonstrations
    info = json.loads(paths["world"].read_text())
    assert info["mean_gold_score"]["pretrain_chat"] < mean - 0.2


def test_model_config_builds_a_model_that_runs(world):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["paths"]["tokenizer"])
    config = AutoConfig.from_pretrained(world["paths"]["model_config"])
    assert config.model_type == "llama"
    assert config.vocab_size == len(tok)
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (
        tok.pad_token_id,
        tok.eos_token_id,
        tok.bos_token_id,
    )
    assert config.hidden_size == 128 and config.num_hidden_layers == 3 and not config.tie_word_embeddings
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    texts = [PROMPT_TEMPLATE.format(prompt=SHORT_CAT) + " the cat is happy today .", "the cat is sad ."]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.loss)
