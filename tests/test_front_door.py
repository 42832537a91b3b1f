"""The commands around a run: `rlhf --version`, `env`, the model card every final/ gets, `push` (against a stand-in
of the hub API), `report`, `chat`, `generate`'s prompt format, `recipes` and `init`."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS, REPO

from rlhf.cli import main
from rlhf.config import ConfigError, FormatConfig, load_config, save_config, to_dict
from rlhf.runtime.checkpoints import publish_final
from rlhf.runtime.model_card import GENERATED, model_card, read_front_matter, stage_of, write_model_card
from rlhf.tools.chat import Chat, run_format
from rlhf.tools.push import PushError, push
from rlhf.tools.recipes import find_recipe, init_recipe, list_recipes, recipe_book
from rlhf.tools.report import build_report, write_report

# --------------------------------------------------------------------------------------------------
# rlhf --version, rlhf env
# --------------------------------------------------------------------------------------------------


def test_version_is_the_package_metadata(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"rlhf {version('rlhf')}"


def test_env_names_versions_devices_precision_processes_and_plan(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for name in ("python", "torch", "transformers", "accelerate", "peft", "datasets", "tokenizers", "huggingface_hub"):
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), name
    assert "cpu:" in out and "mixed_precision auto" in out and "accelerate launch" in out
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    plan = env["rlhf plan assumes (without --topology / --num-processes)"]
    assert plan["topology"] == "ddp" and plan["processes"] == "1"  # the plan subcommand's own defaults


# --------------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------------


def stage_dict(stage: str, yaml_name: str, overrides: list[str] = ()) -> dict:
    return to_dict(load_config(stage, str(CONFIGS / "tiny" / yaml_name), list(overrides)))


@pytest.mark.parametrize(
    "stage, yaml_name, expected",
    [("sft", "pretrain.yaml", "pretrain"), ("sft", "sft.yaml", "sft"), ("rm", "rm.yaml", "rm")]
    + [("dpo", "dpo.yaml", "dpo"), ("ppo", "ppo.yaml", "ppo"), ("eval", "eval.yaml", None)],
)
def test_stage_of_a_resolved_config(stage, yaml_name, expected):
    assert stage_of(stage_dict(stage, yaml_name)) == expected


def card_parts(text: str) -> tuple[dict, str]:
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def test_sft_final_has_a_hub_model_card(tiny_sft, tiny_base):
    meta, body = card_parts((tiny_sft / "README.md").read_text())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["rlhf", "sft"]
    assert "base_model" not in meta  # the tiny base was pretrained from scratch: no hub model upstream
    assert f"model.name_or_path: `{tiny_base}`: made by the `pretrain` stage" in body
    assert "architecture only (config.json)" in body  # the pretraining's own start, one level further up
    config = yaml.safe_load((tiny_sft / "rlhf_config.yaml").read_text())
    assert f"| optim.lr | `{config['optim']['lr']}` |" in body
    assert f"`{config['data']['train']['path']}`" in body
    assert "| eval/loss |" in body and "steps logged (metrics.jsonl) | 40" in body
    assert "- torch: " in body and "- transformers: " in body
    base_meta, _ = card_parts((tiny_base / "README.md").read_text())
    assert base_meta["tags"] == ["rlhf", "pretraining"]


def test_stage_settings_lineage_and_base_model(tmp_path):
    sft_final = tmp_path / "sft" / "final"
    sft_final.mkdir(parents=True)
    save_config(
        load_config("sft", str(CONFIGS / "tiny" / "sft.yaml"), ["model.name_or_path=Qwen/Qwen2.5-0.5B"]),
        sft_final / "rlhf_config.yaml",
    )
    write_model_card(sft_final)
    assert read_front_matter(sft_final / "README.md")["base_model"] == "Qwen/Qwen2.5-0.5B"

    ppo = stage_dict("ppo", "ppo.yaml", [f"models.policy.name_or_path={sft_final}"])
    meta, body = card_parts(model_card(tmp_path / "ppo" / "final", ppo, "ppo"))
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and meta["tags"] == ["rlhf", "ppo"]
    assert f"`{sft_final}`: made by the `sft` stage" in body and "from [`Qwen/Qwen2.5-0.5B`]" in body
    assert f"| kl.kl_coef | `{ppo['kl']['kl_coef']}` |" in body and "| ppo.cliprange |" in body
    assert "models.reward.name_or_path: `runs/tiny/rm/final`" in body

    _, dpo = card_parts(model_card(tmp_path / "dpo" / "final", stage_dict("dpo", "dpo.yaml"), "dpo"))
    assert "| beta | `0.1` |" in dpo
    meta, rm = card_parts(model_card(tmp_path / "rm" / "final", stage_dict("rm", "rm.yaml"), "rm"))
    assert "| ensemble.size | `3` |" in rm and meta["pipeline_tag"] == "text-classification"
    meta, _ = card_parts(
        model_card(tmp_path / "x", stage_dict("sft", "sft.yaml", ["data.train.path=org/data"]), "sft")
    )
    assert meta["datasets"] == ["org/data"]  # hub datasets go to the front matter, local files do not


class OneProcess:
    """What publish_atomically asks of an Accelerator, for a single process."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def test_publish_final_writes_the_card_inside_the_atomic_publish(tmp_path):
    cfg = load_config("dpo", str(CONFIGS / "tiny" / "dpo.yaml"), [f"output_dir={tmp_path}"])
    seen = {}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"weights")
        save_config(cfg, tmp / "rlhf_config.yaml")
        seen["tmp"] = tmp

    final = publish_final(OneProcess(), tmp_path, write, {})
    assert seen["tmp"].name == "final.tmp" and not seen["tmp"].exists()
    assert sorted(p.name for p in final.iterdir()) == ["README.md", "model.safetensors", "rlhf_config.yaml"]
    assert (final / "model.safetensors").read_bytes() == b"weights"
    assert card_parts((final / "README.md").read_text())[0]["tags"] == ["rlhf", "dpo"]


def test_a_card_that_fails_only_warns_and_the_final_is_published(tmp_path, capsys, monkeypatch):
    import rlhf.runtime.model_card

    def broken(*args, **kwargs):
        raise KeyError("data")

    monkeypatch.setattr(rlhf.runtime.model_card, "model_card", broken)

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"weights")
        save_config(load_config("dpo", str(CONFIGS / "tiny" / "dpo.yaml")), tmp / "rlhf_config.yaml")

    final = publish_final(OneProcess(), tmp_path, write, {})
    assert (final / "model.safetensors").is_file() and not (final / "README.md").exists()
    assert "warning: no model card" in capsys.readouterr().out


def test_writing_a_card_touches_no_other_file(tiny_sft, tmp_path):
    copy = shutil.copytree(tiny_sft, tmp_path / "final")

    def digests() -> dict:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in copy.iterdir() if p.name != "README.md"}

    before = digests()
    write_model_card(copy)
    assert digests() == before


# --------------------------------------------------------------------------------------------------
# rlhf push, against a stand-in of the hub API
# --------------------------------------------------------------------------------------------------


class FakeHfApi:
    """Records what push asks of huggingface_hub.HfApi; `fail` makes the upload raise as a refused one would."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        if self.fail:
            raise RuntimeError("401 Unauthorized")
        self.calls.append(
            ("upload_folder", kw["repo_id"], kw | {"files": sorted(p.name for p in Path(kw["folder_path"]).iterdir())})
        )


def test_push_resolves_a_run_dir_and_uploads_its_final(tiny_sft):
    api = FakeHfApi()
    model_dir, files = push(tiny_sft.parent, "me/tiny-sft", private=True, revision="v1", api=api)
    assert model_dir == tiny_sft
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][2] == {"private": True, "repo_type": "model", "exist_ok": True}
    assert api.calls[1][2]["branch"] == "v1" and api.calls[2][2]["revision"] == "v1"
    assert api.calls[2][2]["folder_path"] == str(tiny_sft)
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(api.calls[2][2]["files"])
    assert set(files) == set(api.calls[2][2]["files"])


def test_push_dry_run_sends_and_writes_nothing(tiny_sft, tmp_path, capsys):
    copy = shutil.copytree(tiny_sft, tmp_path / "sft" / "final")
    (copy / "README.md").unlink()

    class Refuses:
        def __getattr__(self, name):
            raise AssertionError(f"dry run called HfApi.{name}")

    _, files = push(copy, "me/x", dry_run=True, api=Refuses())
    assert "README.md" in files and not (copy / "README.md").exists()
    assert main(["push", str(copy.parent), "me/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload" in out and "  model.safetensors" in out and "model card would be written" in out


def test_push_writes_a_missing_card_and_adds_the_runs_eval(tiny_sft, tmp_path):
    run = tmp_path / "run"
    final = shutil.copytree(tiny_sft, run / "ppo" / "final")
    (final / "README.md").unlink()
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps({"policy": str(final), "win_rate": 0.71, "kl_to_sft": 3.2}))
    push(run / "ppo", "me/x", api=FakeHfApi())
    card = (final / "README.md").read_text()
    assert GENERATED in card and "| win_rate | 0.71 |" in card and "| kl_to_sft | 3.2 |" in card


def test_push_refuses_incomplete_dirs_and_reports_hub_failures(tiny_sft, tmp_path, monkeypatch, capsys):
    copy = shutil.copytree(tiny_sft, tmp_path / "a" / "final")
    shutil.copytree(tiny_sft, tmp_path / "b" / "final")
    with pytest.raises(ConfigError, match="holds several runs"):
        push(tmp_path, "me/x", api=FakeHfApi())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    with pytest.raises(ConfigError, match="lacks a tokenizer"):
        push(copy, "me/x", api=FakeHfApi())
    with pytest.raises(PushError, match="401 Unauthorized"):
        push(tmp_path / "b", "me/x", api=FakeHfApi(fail=True))
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: FakeHfApi(fail=True))  # the default client
    assert main(["push", str(tmp_path / "b"), "me/x"]) == 1
    assert main(["push", str(copy), "me/x"]) == 2
    assert "upload of" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# rlhf report
# --------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake_run_root(root: Path) -> Path:
    """A pipeline run root as the stages leave it, with made-up numbers: sft, a 2-member rm ensemble, ppo, eval."""
    write_jsonl(
        root / "sft" / "metrics.jsonl",
        [{"step": s, "train/loss": 3 - s / 10, "eval/loss": 3.1 - s / 10} for s in range(1, 8)],
    )
    (root / "sft" / "config.yaml").write_text("output_dir: runs/x/sft\noptim: {lr: 0.0003}\n")
    for m in (0, 1):
        write_jsonl(
            root / "rm" / f"member-{m}" / "metrics.jsonl",
            [{"step": s, "train/loss": 0.7 - s / 50, "eval/accuracy": 0.5 + s / 40 + m / 100} for s in range(1, 6)],
        )
    (root / "rm" / "final").mkdir()
    (root / "rm" / "final" / "ensemble.json").write_text(
        json.dumps({"members": ["../member-0/final"], "holdout": ["../member-1/final"]})
    )
    ppo = [
        {
            "step": s,
            "objective/scores": s / 10,
            "objective/kl": s / 5,
            "objective/kl_coef": 0.2 * 0.9**s,
            "rollout/collapse_flags": int(s > 6),
            "rollout/distinct2": 0.5,
        }
        for s in range(1, 9)
    ]
    write_jsonl(root / "ppo" / "metrics.jsonl", ppo)
    sft_row = {"name": "sft", "step": 0, "kl_to_sft": 0.0, "rm_score": 0.0, "proxy_score": 0.0}
    rows = [
        {
            "name": f"checkpoint-{s}",
            "step": s,
            "kl_to_sft": s / 2,
            "rm_score": s / 5,
            "proxy_score": s / 7,
            "collapse": [],
        }
        for s in (4, 8)
    ]
    rows[-1]["collapse"] = ["repeat share 0.6 > 0.5"]
    frontier = {
        "best": {"name": "checkpoint-4", "step": 4, "kl_to_sft": 2.0, "proxy_score": 0.57},
        "selected_by": "proxy_score",
        "sft": sft_row,
        "rows": rows,
    }
    (root / "eval").mkdir()
    (root / "eval" / "frontier.json").write_text(json.dumps(frontier))
    (root / "eval" / "eval.json").write_text(
        json.dumps({"kl_to_sft": 2.0, "win_rate": 0.7, "gold_score_sft": 0.5, "gold_score_policy": 0.8})
    )
    samples = [
        {
            "prompt": f"prompt {i // 2}",
            "sft": f"sft answer {i}",
            "policy": f"policy answer {i}",
            "gold_sft": 0.1,
            "gold_policy": 0.9,
        }
        for i in range(6)
    ]
    write_jsonl(root / "eval" / "samples.jsonl", samples)
    return root


def png_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_is_one_self_contained_page(tmp_path):
    root = fake_run_root(tmp_path / "runs")
    path = write_report(root)
    assert path == root / "report.html"
    page = path.read_text()
    assert not re.search(r"https?://|<script|<link|src=\"(?!data:)", page)  # nothing fetched
    images = png_images(page)
    assert len(images) >= 6 and all(img.startswith(b"\x89PNG") for img in images)
    assert 'alt="rm ensemble: held-out pairwise accuracy"' in page and "selects by): member-1." in page
    assert 'alt="rm: Reward model pairwise accuracy"' not in page  # member-0 alone: replaced by the ensemble's
    assert "Collapse flags in 2 of 8 iterations" in page
    assert '<tr class="best"><td>checkpoint-4' in page and "repeat share 0.6 &gt; 0.5" in page
    # the same prompt's SFT and policy samples side by side, once per prompt
    assert "<td>prompt 0</td><td>sft answer 0  [gold 0.1]</td><td>policy answer 0  [gold 0.9]</td>" in page
    assert page.count("<td>prompt 1</td>") == 1
    assert "optim: {lr: 0.0003}" in page and "| pretrain" not in page


def test_report_survives_missing_stages_and_a_single_stage_dir(tmp_path, tiny_sft):
    root = fake_run_root(tmp_path / "runs")
    shutil.rmtree(root / "eval")
    shutil.rmtree(root / "ppo")
    page = build_report(root)
    assert "Frontier" not in page and "Samples" not in page and png_images(page)
    assert "<h1>" in build_report(tmp_path / "runs" / "sft")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "<h1>" in build_report(empty)
    out = tmp_path / "r" / "sft.html"
    assert main(["report", str(tiny_sft.parent), "--out", str(out)]) == 0 and png_images(out.read_text())
    assert main(["report", str(tmp_path / "missing")]) == 2


# --------------------------------------------------------------------------------------------------
# rlhf chat, and generate's prompt format
# --------------------------------------------------------------------------------------------------

PROMPT = "write a short happy sentence about the dog ."  # in the tiny world's vocabulary


def test_the_runs_own_prompt_format(tiny_sft, tmp_path):
    assert run_format(str(tiny_sft)) == FormatConfig(
        **yaml.safe_load((tiny_sft / "rlhf_config.yaml").read_text())["data"]["format"]
    )
    assert run_format(str(tiny_sft), "Q: {prompt} A:").prompt_template == "Q: {prompt} A:"
    assert run_format(str(tmp_path)) == FormatConfig()  # no saved config: the defaults


def test_chat_renders_the_history_through_the_runs_format(tiny_sft):
    chat = Chat(str(tiny_sft))
    assert chat.describe() == "'Human: {prompt} Assistant:'"
    first = chat.reply(PROMPT, 8, 1.0, 1.0, greedy=True)
    assert chat.history == [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": first},
    ]
    text = chat.tokenizer.decode(chat.prompt_ids("tell me a long sad line about the cow .", 8))
    assert text.count("Human:") == 2 and text.rstrip().endswith(
        "Human: tell me a long sad line about the cow . Assistant:"
    )


def test_chat_reads_turns_from_stdin_until_exit(tiny_sft, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPT}\n\n/reset\n{PROMPT}\n/exit\nnever read\n"))
    assert main(["chat", str(tiny_sft), "--greedy", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    replies = captured.out.splitlines()
    assert len(replies) == 2 and replies[0] == replies[1]  # greedy, and /reset forgot the first turn
    assert "conversation cleared" in captured.err and "'Human: {prompt} Assistant:'" in captured.err


def test_generate_uses_the_runs_format_with_the_template_as_an_override(tiny_sft, capsys, monkeypatch):
    import rlhf.tools.generate as generate_tool

    seen = []
    real = generate_tool.encode_prompts
    monkeypatch.setattr(
        generate_tool, "encode_prompts", lambda tok, fmt, rows: seen.append(fmt) or real(tok, fmt, rows)
    )
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_sft),
                "--prompt",
                PROMPT,
                "--greedy",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_sft),
                "--prompt",
                "hi",
                "--prompt-template",
                "Q: {prompt} A:",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert seen[0] == run_format(str(tiny_sft)) and seen[1].prompt_template == "Q: {prompt} A:"
    assert f">>> {PROMPT}" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# rlhf recipes, rlhf init, and the recipes in the package
# --------------------------------------------------------------------------------------------------


def test_recipes_ship_with_the_package_and_are_listed(capsys):
    assert (recipe_book() / "tiny" / "sft.yaml").is_file()
    names = [r.name for r in list_recipes()]
    assert names == sorted(p.parent.name for p in CONFIGS.glob("*/recipe.yaml")) and "tiny" in names
    assert "accelerate" not in names
    for r in list_recipes():
        assert all([r.model, r.method, r.data, r.cost, r.run_root]), r
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(names) + 1 and lines[-1].startswith("tiny ")


def test_init_copies_a_recipe_and_refuses_to_overwrite(tmp_path, capsys):
    dest = tmp_path / "my-run"
    written = init_recipe("tiny", dest)
    shipped = sorted(p.name for p in (CONFIGS / "tiny").glob("*.yaml"))
    assert sorted(p.name for p in written) == shipped
    for name in shipped:
        if name != "recipe.yaml":
            assert (dest / name).read_text() == (CONFIGS / "tiny" / name).read_text()
    assert yaml.safe_load((dest / "recipe.yaml").read_text()) == {"run_root": str((dest / "runs").resolve())}
    with pytest.raises(ConfigError, match="--force"):
        init_recipe("tiny", dest)
    (dest / "sft.yaml").write_text("changed")
    assert main(["init", "tiny", str(dest)]) == 2 and (dest / "sft.yaml").read_text() == "changed"
    assert main(["init", "tiny", str(dest), "--force"]) == 0
    assert (dest / "sft.yaml").read_text() == (CONFIGS / "tiny" / "sft.yaml").read_text()
    with pytest.raises(ConfigError, match="tiny"):
        find_recipe("no-such-recipe")
    assert main(["init", "no-such-recipe", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_the_wheel_carries_the_recipes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "rlhf", src / "rlhf", ignore=ignore)
    shutil.copytree(REPO / "configs", src / "configs", ignore=ignore)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(src),
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("rlhf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in CONFIGS.glob("*/*.yaml"):
        assert f"rlhf/recipes/{path.parent.name}/{path.name}" in names
    assert "rlhf/recipes/__init__.py" in names and "rlhf/cli.py" in names
