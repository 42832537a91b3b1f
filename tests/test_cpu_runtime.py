"""CPU runtime: independent models' work side by side in threads (train.concurrent_models, ModelLanes) and the
allocator settings of CPU runs (keep_freed_memory)."""

from __future__ import annotations

import ctypes
import platform
import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import ppo_config, read_metrics

from rlhf.runtime import accelerator as runtime
from rlhf.runtime.cpu import ModelLanes, concurrent_models, keep_freed_memory
from rlhf.stages import ppo


def test_lanes_run_each_task_in_its_own_thread_with_a_share_of_the_cores():
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        lanes = ModelLanes(True)
    finally:
        torch.set_num_threads(previous)
    barrier = threading.Barrier(2, timeout=30)  # both tasks must be running at once to pass it

    def task():
        barrier.wait()
        return threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()

    with torch.no_grad():
        first, second = lanes.run(task, task)
    # the first lane is the caller's thread and takes the odd thread; grad mode is carried into the other
    assert first == (threading.current_thread().name, 2, False)
    assert second == ("rlhf-lane1_0", 1, False)
    assert torch.get_num_threads() == previous  # the caller's thread count is back


def test_lanes_carry_cpu_autocast_and_return_in_order():
    lanes = ModelLanes(True)
    linear = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)

    def forward():
        return linear(x).dtype

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lanes.run(forward, lambda: "second") == [torch.bfloat16, "second"]
    assert lanes.run(forward, lambda: "second") == [torch.float32, "second"]


def test_a_failing_lane_raises_after_the_other_has_finished():
    lanes = ModelLanes(True)
    threads = torch.get_num_threads()
    finished = threading.Event()

    def fails():
        raise ValueError("lane broke")

    def slow():
        finished.wait(0.2)
        finished.set()
        return 1

    for tasks in ((fails, slow), (slow, fails)):
        finished.clear()
        with pytest.raises(ValueError, match="lane broke"):
            lanes.run(*tasks)
        assert finished.is_set()  # nothing left running behind the error
        assert torch.get_num_threads() == threads


def test_sequential_lanes_run_in_order_on_the_callers_thread():
    lanes = ModelLanes(False)
    assert not lanes.concurrent
    names = lanes.run(*(lambda: threading.current_thread().name for _ in range(2)))
    assert names == [threading.current_thread().name] * 2


def test_when_models_run_side_by_side():
    notes = []

    def accelerator(processes=1, device="cpu", scaler=None):
        return SimpleNamespace(num_processes=processes, device=torch.device(device), scaler=scaler, print=notes.append)

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert not concurrent_models(accelerator(), "auto")  # one core: nothing to split
        assert concurrent_models(accelerator(), "on")
        torch.set_num_threads(2)
        assert concurrent_models(accelerator(), "auto")
        assert not concurrent_models(accelerator(), "off")
        # collectives of several processes must keep one order; fp16's one loss scaler; GPUs (not measured)
        for other in (accelerator(processes=2), accelerator(scaler=object()), accelerator(device="cuda")):
            assert not concurrent_models(other, "auto")
            assert not concurrent_models(other, "on")
    finally:
        torch.set_num_threads(previous)
    assert len(notes) == 3 and all("run in sequence" in note for note in notes)  # said only when asked for
    # dropout and gradient checkpointing use the one global random generator: in sequence
    dropout = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    checkpointed = torch.nn.Sequential(torch.nn.Linear(2, 2))
    checkpointed[0].gradient_checkpointing = True
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0))
    assert concurrent_models(accelerator(), "on", [plain, plain])
    for model in (dropout, checkpointed):
        assert not concurrent_models(accelerator(), "on", [plain, model])
    assert "dropout" in notes[-2] and "gradient checkpointing" in notes[-1]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "variant",
    [
        [],
        ["models.policy.lora.enabled=true", "models.reference=disable_adapter"],
    ],
    ids=["full", "lora"],
)
def test_concurrent_ppo_trains_the_weights_sequential_ppo_does(tiny_world, tiny_sft, tiny_rm, tmp_path, variant):
    """The policy and critic side by side (rollout scoring, backward and gradient norm, optimizer step; ptx on,
    gradient clipping on) train the same weights and log the same statistics as one after the other, to the bit
    (one intra-op thread per lane here, as in the sequential run)."""
    extra = ["train.max_steps=2", "ptx.ptx_coef=0.5", "optim.max_grad_norm=0.5", *variant]
    runs = {}
    for setting in ("off", "on"):
        out = tmp_path / setting
        trainer = ppo.PPOTrainer(
            ppo_config(tiny_world, tiny_sft, tiny_rm, out, [*extra, f"train.concurrent_models={setting}"])
        )
        assert trainer.lanes.concurrent == (setting == "on")
        trainer.train()
        timings = ("time", "tokens_per_s")  # wall clock: "time", "time/generate", ...
        rows = [{k: v for k, v in r.items() if not k.startswith(timings)} for r in read_metrics(out)]
        runs[setting] = _state(trainer.policy), _state(trainer.value_model), rows
    (policy_a, value_a, rows_a), (policy_b, value_b, rows_b) = runs["off"], runs["on"]
    for a, b in ((policy_a, policy_b), (value_a, value_b)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    updates_a, updates_b = ([r for r in rows if "loss/policy_avg" in r] for rows in (rows_a, rows_b))
    assert len(updates_a) == len(updates_b) == 2
    for a, b in zip(updates_a, updates_b):
        assert a.keys() == b.keys()
        assert {k: (a[k], b[k]) for k in a if a[k] != b[k]} == {}
    assert any(r.get("ptx/loss", 0) > 0 for r in rows_b)


def test_cpu_runs_keep_freed_memory_unless_the_environment_says_otherwise(monkeypatch):
    calls = []

    def mallopt(param, value):
        calls.append((param.value, value.value))
        return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=mallopt))
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    for env in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(env, raising=False)
    assert keep_freed_memory() == {"MALLOC_MMAP_THRESHOLD_": True, "MALLOC_TRIM_THRESHOLD_": True}
    # M_MMAP_THRESHOLD = -3 at glibc's 64-bit ceiling; M_TRIM_THRESHOLD = -1
    assert calls == [(-3, 32 * 1024 * 1024), (-1, 2**31 - 1)]
    calls.clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's setting wins
    assert keep_freed_memory() == {"MALLOC_MMAP_THRESHOLD_": True}
    assert calls == [(-3, 32 * 1024 * 1024)]
    calls.clear()
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))  # musl, macOS: nothing to set
    assert keep_freed_memory() == {} and calls == []


def test_a_cpu_accelerator_sets_the_allocator(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: seen.append(True) or {})
    runtime.make_accelerator("no", tmp_path, tensorboard=False, cpu=True)
    assert seen == [True]


@pytest.mark.parametrize(
    "extra",
    [["models.policy.gradient_checkpointing=true"], ["ppo.advantage=rloo", "rollout.samples_per_prompt=4"]],
    ids=["gradient-checkpointing", "critic-free"],
)
def test_ppo_runs_in_sequence_with_checkpointing_or_without_a_critic(tiny_world, tiny_sft, tiny_rm, tmp_path, extra):
    cfg = ppo_config(
        tiny_world, tiny_sft, tiny_rm, tmp_path, ["train.max_steps=1", "train.concurrent_models=on", *extra]
    )
    assert not ppo.PPOTrainer(cfg).lanes.concurrent
