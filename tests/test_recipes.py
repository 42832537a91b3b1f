"""The real-model recipes (configs/qwen2.5-0.5b-hh*) end to end on faithful local stand-ins.

No hub here, so: a tiny Qwen2 (tied embeddings, as Qwen2.5-0.5B) with a ChatML tokenizer whose `eos_token` and
pad are `<|endoftext|>` while turns end with `<|im_end|>`, and a tiny Llama with a Llama-3 tokenizer (BOS in its
template, turns ending `<|eot_id|>`, no pad token); UltraChat-200k rows (`prompt`, `prompt_id`,
`messages`; splits train_sft/test_sft/train_gen/test_gen) and Anthropic HH-RLHF rows (raw `chosen`/`rejected`
transcripts) saved as `datasets` dirs. The recipes run with overrides that change only locations and sizes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import CONFIGS

from rlhf.config import load_config
from rlhf.data.sources import load_rows
from rlhf.models.loading import load_tokenizer
from rlhf.stages import evaluate, ppo, sft
from rlhf.stages import reward_model as reward

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FRUITS = ["apple", "pear", "plum", "fig", "lime", "kiwi"]
COLOURS = ["red", "green", "yellow", "purple", "brown", "orange"]


def conversation(rng: random.Random) -> list[dict]:
    fruit = rng.choice(FRUITS)
    turns = [
        {"role": "user", "content": f"What colour is a {fruit}?"},
        {"role": "assistant", "content": f"A {fruit} is {rng.choice(COLOURS)}."},
    ]
    if rng.random() < 0.5:
        turns += [
            {"role": "user", "content": "And another fruit?"},
            {"role": "assistant", "content": f"A {rng.choice(FRUITS)} is {rng.choice(COLOURS)}."},
        ]
    return turns


def hh_text(turns: list[dict]) -> str:
    return "".join(f"\n\n{'Human' if t['role'] == 'user' else 'Assistant'}: {t['content']}" for t in turns)


LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# family -> (special tokens, chat template, tokenizer's own special-token roles, tied embeddings, turn end)
FAMILIES = {
    "qwen2": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        CHATML,
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},  # pad == eos, as Qwen2.5
        True,
        "<|im_end|>",
    ),
    "llama": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        LLAMA3,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},  # no pad token at all, as Llama-3
        False,
        "<|eot_id|>",
    ),
}


def build_family(family: str, corpus: list[str], out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials, template, roles, tied, _ = FAMILIES[family]
    backend = Tokenizer(models.BPE(unk_token=specials[0]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    tok.chat_template = template
    config_class, model_class = (
        (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    )
    config = config_class(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    model_class(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    import datasets

    root = tmp_path_factory.mktemp("stand_ins")
    rng = random.Random(0)
    ultra = {
        split: [
            {"prompt": c[0]["content"], "prompt_id": f"{split}-{i}", "messages": c}
            for i, c in enumerate(conversation(rng) for _ in range(n))
        ]
        for split, n in (("train_sft", 96), ("test_sft", 16), ("train_gen", 96), ("test_gen", 16))
    }
    hh = {}
    for split, n in (("train", 96), ("test", 16)):
        rows = []
        for _ in range(n):
            c = conversation(rng)
            worse = dict(c[-1], content="I do not know.")
            rows.append({"chosen": hh_text(c), "rejected": hh_text(c[:-1] + [worse])})
        hh[split] = rows
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in ultra.items()}).save_to_disk(root / "ultra")
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in hh.items()}).save_to_disk(root / "hh")
    corpus = [m["content"] for rows in ultra.values() for r in rows for m in r["messages"]] + ["user assistant"] * 4
    out = {family: build_family(family, corpus, root / family) for family in FAMILIES}
    return out | {"ultra": root / "ultra", "hh": root / "hh", "root": root}


SMALL = ["logging.progress=off", "logging.tensorboard=false", "checkpoint.every=0", "train.mixed_precision=no"]


def recipe(stage: str, name: str, overrides: list[str]):
    return load_config(stage, str(CONFIGS / name / f"{stage}.yaml"), overrides)


@pytest.mark.parametrize(
    "name, family",
    [
        ("qwen2.5-0.5b-hh", "qwen2"),
        ("qwen2.5-0.5b-hh-lora", "qwen2"),
        ("qwen2.5-0.5b-hh", "llama"),
        ("qwen2.5-0.5b-hh-lora", "llama"),
    ],
)
def test_recipe_end_to_end_on_stand_ins(name, family, stand_ins, tmp_path):
    s, out = stand_ins, tmp_path / "runs"
    fmt = ["data.format.max_length=96", "data.format.max_prompt_length=64"]
    sft_final = sft.train(
        recipe(
            "sft",
            name,
            SMALL
            + fmt
            + [
                f"output_dir={out / 'sft'}",
                f"model.name_or_path={s[family]}",
                f"data.train.path={s['ultra']}",
                f"data.eval.path={s['ultra']}",
                "data.train.max_rows=64",
                "data.eval.max_rows=8",
                "train.max_steps=3",
                "train.batch_size=8",
                "train.micro_batch_size=4",
                "train.eval_every=0",
                "optim.warmup_steps=1",
            ],
        )
    )
    tok = load_tokenizer(str(sft_final))
    assert tok.eos_token == FAMILIES[family][4]  # responses end where the template ends a turn; final/ keeps it
    assert tok.pad_token_id not in (tok.eos_token_id, None)
    rm_final = reward.train(
        recipe(
            "rm",
            name,
            SMALL
            + fmt
            + [
                f"output_dir={out / 'rm'}",
                f"model.name_or_path={sft_final}",
                f"data.train.path={s['hh']}",
                f"data.eval.path={s['hh']}",
                f"data.reference.path={s['ultra']}",
                "data.reference_max_rows=8",
                "train.max_steps=3",
                "train.batch_size=8",
                "train.micro_batch_size=4",
                "train.eval_every=0",
                "optim.warmup_steps=1",
            ],
        )
    )
    ppo_final = ppo.train(
        recipe(
            "ppo",
            name,
            SMALL
            + fmt
            + [
                f"output_dir={out / 'ppo'}",
                f"models.policy.name_or_path={sft_final}",
                f"models.reward.name_or_path={rm_final}",
                f"data.prompts.path={s['ultra']}",
                f"data.eval_prompts.path={s['ultra']}",
                "data.eval_prompts.max_rows=8",
                f"ptx.data.path={s['ultra']}",
                "ptx.max_length=96",
                "rollout.max_new_tokens=12",
                "rollout.generation_batch_size=8",
                "train.max_steps=2",
                "train.batch_size=8",
                "ppo.mini_batch_size=4",
                "ppo.micro_batch_size=4",
                "optim.warmup_steps=1",
            ],
        )
    )
    result = evaluate.run(
        recipe(
            "eval",
            name,
            [
                f"output_dir={out / 'eval'}",
                f"run_dir={out / 'ppo'}",
                f"sft={sft_final}",
                f"reward_model={rm_final}",
                f"prompts.path={s['ultra']}",
                "num_prompts=8",
                "max_new_tokens=12",
                "batch_size=8",
                "format.max_length=96",
                "format.max_prompt_length=64",
            ],
        )
    )
    assert result["num_samples"] == 8 and isinstance(result["kl_to_sft"], float)
    # the defences the recipe ships with: an ensemble with a held-out proxy, a KL target and budget, the frontier
    assert json.loads((rm_final / "ensemble.json").read_text())["holdout"]
    assert (out / "eval" / "frontier.json").is_file()
    ppo_cfg = recipe("ppo", name, [])
    assert ppo_cfg.kl.adaptive and ppo_cfg.kl.target > 0 and ppo_cfg.kl.budget > ppo_cfg.kl.target
    # every final/ loads with the Auto classes; a LoRA recipe's final/ is merged weights (merge_on_save)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(ppo_final)
    members = json.loads((rm_final / "ensemble.json").read_text())["members"]
    AutoModelForSequenceClassification.from_pretrained((rm_final / members[0]).resolve())
    if name.endswith("lora"):
        assert not (ppo_final / "adapter_config.json").exists()
    rows = [json.loads(x) for x in (out / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert rows and all(r["prompt"].count("What colour") == 1 for r in rows)  # no reference answer in the prompt


def test_public_rows_render_identically_in_every_stage(stand_ins):
    """The same conversation prefix renders to the same ChatML prompt whether it came as an UltraChat prompt
    row (PPO), an UltraChat SFT row or an HH comparison (RM)."""
    from rlhf.config import FormatConfig
    from rlhf.data.encoding import encode_prompts

    fmt = FormatConfig(max_length=96, max_prompt_length=64)
    tok = load_tokenizer(str(stand_ins["qwen2"]), fmt=fmt)
    convo = [
        {"role": "user", "content": "What colour is a fig?"},
        {"role": "assistant", "content": "A fig is purple."},
        {"role": "user", "content": "And another fruit?"},
        {"role": "assistant", "content": "A lime is green."},
    ]
    root = stand_ins["root"]
    (root / "one_sft.jsonl").write_text(json.dumps({"prompt": convo[0]["content"], "messages": convo}) + "\n")
    (root / "one_hh.jsonl").write_text(
        json.dumps({"chosen": hh_text(convo), "rejected": hh_text(convo[:-1] + [dict(convo[-1], content="No.")])})
        + "\n"
    )
    (root / "one_gen.jsonl").write_text(json.dumps({"messages": convo[:3]}) + "\n")
    sft_row = load_rows(str(root / "one_sft.jsonl"), "sft")[0].to_list()
    hh_row = load_rows(str(root / "one_hh.jsonl"), "preference")[0].to_list()
    gen_row = load_rows(str(root / "one_gen.jsonl"), "prompts")[0].to_list()
    assert hh_row[0]["ranked"] == ["A lime is green.", "No."] and sft_row[0]["completion"] == "A lime is green."
    rendered = {len(set(map(tuple, encode_prompts(tok, fmt, rows)))) for rows in (sft_row, hh_row, gen_row)}
    assert rendered == {1}
    prompts = [encode_prompts(tok, fmt, rows)[0] for rows in (sft_row, hh_row, gen_row)]
    assert prompts[0] == prompts[1] == prompts[2]
