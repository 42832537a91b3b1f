"""`make bench-peer`: rlhf and TRL measured side by side on this machine, on identical workloads.

TRL is a benchmark peer, never a dependency of rlhf: this script builds its own venv (.venv-peer) with trl==1.12.0
(whose PPO lives in trl.experimental.ppo) on top of the same torch as .venv, and runs each side in a fresh
subprocess (rlhf in .venv via scripts/peer/rlhf_worker.py, TRL in .venv-peer via scripts/peer/trl_worker.py),
alternating rlhf, TRL, rlhf, TRL, ... Peak RSS is read per run with os.wait4. Everything is offline
(HF_HUB_OFFLINE=1): the tokenizer, random-init models and synthetic data are built locally by
scripts/peer/world.py into runs/bench-peer/world (--size tiny) or runs/bench-peer/world-small, which both sides load.

Sizes (CPU, random-init Llama, vocabulary 568; L = sequence length, P = prompt, R = PPO's new tokens):
  tiny   3.46M parameters: 4 layers, d 256, 4 heads, MLP 688; L 128, P 32, R 32
  small  25.9M parameters: 8 layers, d 512, 8 heads, MLP 1376, 256-token context; L 256, P 64, R 192
Workloads:
  ppo   32 episodes per iteration, P-token prompts, R new tokens (EOS stops/truncates on both sides),
        4 PPO epochs x 4 minibatches of 8 (micro-batch = minibatch), value model = RM architecture
  sft   8 sequences x L tokens per step, loss on completions
  rm    8 pairs x L tokens per step
  rmk4  8 prompts x 4 ranked responses x L tokens (rlhf: K-way loss; TRL: the 6 pairs per prompt, 48 pairs)
  ppovar  ppo with prompts of variable length (VAR_LENGTHS, at most P tokens), left-padded on both sides
  grpo  TRL's GRPO defaults: 8 prompts x 4 completions (R new tokens) per step, group-normalised rewards, one
        optimizer step per generation batch, no KL term and so no reference model (rlhf: ppo.advantage=grpo,
        ppo_epochs 1, one minibatch, kl_coef 0, models.reference=none), gradients clipped at 1 on both sides
  dpo   8 pairs x L tokens per step, beta 0.1, sigmoid loss, the reference a frozen copy of the LM on both sides
  sftvar, rmvar, rmk4var, dpovar   the same with variable lengths (scripts/peer/world.py VAR_LENGTHS: log-normal,
        a mean of ~50 of at most L = 128 tokens): 32 rows (prompts) per step in micro-batches of 8, throughput in real
        (unpadded) tokens/s; SFT also runs each side packed (rlhf data.packing=true; TRL packing=True, its
        best-fit-decreasing padding-free packing, 8 packed sequences x 2 accumulation steps); the RM and DPO also run
        rlhf packed (TRL's RewardTrainer has no packing; TRL 1.12's DPOTrainer disables its padding_free)
The first step / iteration of every run is warm-up and is not measured.
Precision (--precision, or per side --rlhf-precision / --trl-precision): no = fp32 (default); bf16 = bf16 autocast
with fp32 master weights (rlhf: train.mixed_precision=bf16; TRL: bf16=True; see scripts/peer/trl_worker.py for
what TRL's PPO autocasts).

    python scripts/bench_peer.py [--size tiny|small] [--precision no|bf16] [--sides rlhf,trl]
        [--workloads ppo,sft,rm,rmk4,dpo,sftvar,rmvar,rmk4var,dpovar] [--reps 3] [--steps N] [--quick] [--threads N]
        [--compile] [--rlhf-set K=V] [--attn IMPL] [--device cpu|cuda] [--peer-python PATH] [--out FILE]

--device cuda runs both sides on the GPU (rlhf train.cpu=false, TRL use_cpu=False) and adds each run's peak GPU
memory (torch.cuda.max_memory_allocated) to the table; the compute floor then uses the GPU's measured GEMM rate.
--peer-python: an interpreter that already has trl==1.12.0 (a lent GPU machine with the wheels carried: see
docs/benchmarks.md) instead of building .venv-peer.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "bench-peer"
PEER = ROOT / ".venv-peer"
PEER_PY = PEER / "bin" / "python"
RLHF_PY = Path(sys.executable)
TRL_VERSION = "1.12.0"
WORKLOADS = ("ppo", "sft", "rm", "rmk4", "ppovar", "grpo", "sftvar", "rmvar", "rmk4var", "dpo", "dpovar")
ROLLOUTS = {"ppo", "ppovar", "grpo"}  # a step is an iteration of EPISODES episodes
# variable-length workloads (scripts/peer/world.py VAR_LENGTHS: log-normal lengths, ~50 of at most 128 tokens for the
# tiny size): 32 rows per step in micro-batches of 8 on both sides; throughput = real (unpadded) tokens per second.
# Each side also runs in its best configuration for the workload where it has one (SFT: packing).
VARLEN = {"sftvar", "rmvar", "rmk4var", "dpovar"}
# (TRL's RewardTrainer has no packing, and TRL 1.12's DPOTrainer turns padding_free=True off with a warning,
# "temporarily unavailable after a refactor": their defaults are their best)
BEST = {
    "sftvar": {"rlhf": "packed: data.packing=true", "trl": "packed: packing=True, bfd, padding-free"},
    "rmvar": {"rlhf": "packed: data.packing=true"},
    "rmk4var": {"rlhf": "packed: data.packing=true"},
    "dpovar": {"rlhf": "packed: data.packing=true"},
}
SIDES = ("rlhf", "trl")
# sequence length L, PPO prompt P and new tokens R per size (scripts/peer/world.py builds these; model.json has them)
SIZES = {"tiny": dict(L=128, P=32, R=32), "small": dict(L=256, P=64, R=192)}
# sequences per step (rmk4: unique responses, 8 x 4, although TRL forwards each response 3 times); tokens = x L
SEQUENCES = {"sft": 8, "rm": 8 * 2, "rmk4": 8 * 4, "dpo": 8 * 2}
EPISODES = 32
PRECISION = {"no": "fp32", "bf16": "bf16 autocast (fp32 weights)"}
DOC = ROOT / "docs" / "benchmarks.md"
HEADING = "## Against TRL (`make bench-peer`)"


def log(msg: str) -> None:
    print(f"[bench-peer] {msg}", flush=True)


def run(cmd: list, env: dict | None = None) -> None:
    subprocess.run([str(c) for c in cmd], check=True, env=env)


def rlhf_version(pkg: str, python: Path) -> str:
    code = f"import importlib.metadata as m; print(m.version({pkg!r}))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def ensure_peer_venv() -> None:
    """.venv-peer: the same torch (and transformers/accelerate) as .venv, plus trl==1.12.0. Never an unpinned torch."""
    torch_v = rlhf_version("torch", RLHF_PY)
    pins = [f"torch=={torch_v}"]
    for pkg in ("transformers", "accelerate"):
        pins.append(f"{pkg}=={rlhf_version(pkg, RLHF_PY)}")
    want = pins + [f"trl=={TRL_VERSION}", "requests"]  # requests: imported by TRL's GRPO, not declared by trl
    stamp = PEER / ".bench-peer-installed"
    if stamp.is_file() and stamp.read_text().split() == want:
        return
    log(f"building {PEER.name} with {' '.join(want)}")
    if not PEER_PY.exists():
        base = Path(getattr(sys, "_base_executable", sys.executable))
        run([base, "-m", "venv", PEER])
    run([PEER_PY, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    run([PEER_PY, "-m", "pip", "install", "-q", pins[0]])  # torch first, pinned: pip never resolves a CUDA build
    run([PEER_PY, "-m", "pip", "install", "-q", *want])
    got = rlhf_version("torch", PEER_PY)
    if got != torch_v:
        raise SystemExit(f"{PEER.name} got torch {got}, .venv has {torch_v}")
    stamp.write_text(" ".join(want) + "\n")


def child_env(threads: int, device: str = "cpu") -> dict:
    env = dict(os.environ)
    # the repo first, then whatever the caller's path holds (carried wheels on a lent machine)
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env |= {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "WANDB_DISABLED": "true",
        "PYTHONPATH": path,
    }
    if device == "cpu":  # on cuda the caller's choice of GPU stands
        env.pop("CUDA_VISIBLE_DEVICES", None)
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


def world_dir(size: str) -> Path:
    return OUT / ("world" if size == "tiny" else f"world-{size}")


@dataclass(frozen=True)
class Setup:
    """What every run of one invocation shares. `sets`: rlhf overrides; `compile`: TRL's torch_compile (SFT, RM; its
    PPO has none), rlhf's train.compile arrives in `sets`; `attn`: both sides' attn_implementation (empty: each
    side's default); `peer_py`: the interpreter that runs TRL."""

    size: str
    threads: int
    sets: list[str]
    compile: bool
    attn: str
    device: str
    peer_py: Path


def variants(workload: str, sides: list[str]) -> list[tuple[str, bool]]:
    """(side, best) pairs a workload runs: each side as it comes, and in its best configuration where BEST has one."""
    return [(side, best) for side in sides for best in (False, True) if not best or side in BEST.get(workload, {})]


def variant_label(side: str, best: bool, workload: str) -> str:
    return f"{side} {BEST[workload][side].split(':')[0]}" if best else side


def run_worker(
    side: str, workload: str, steps: int, rep: int, precision: str, setup: Setup, best: bool = False
) -> dict:
    """One fresh process; its own peak RSS from os.wait4 (RUSAGE of that child alone)."""
    size, attn = setup.size, setup.attn
    python, script = (RLHF_PY, "rlhf_worker.py") if side == "rlhf" else (setup.peer_py, "trl_worker.py")
    name = f"{size}-{precision}-{workload}-{side}{'-best' if best else ''}-{rep}"
    out = OUT / "runs" / name
    result = OUT / "runs" / f"{name}.json"
    result.unlink(missing_ok=True)
    logfile = OUT / "runs" / f"{name}.log"
    cmd = [python, ROOT / "scripts" / "peer" / script, "--workload", workload, "--world", world_dir(size)]
    cmd += ["--out", out, "--steps", str(steps), "--result", result, "--precision", precision]
    cmd += ["--device", setup.device]
    if side == "rlhf":
        cmd += [a for kv in setup.sets + (["data.packing=true"] if best else []) for a in ("--set", kv)]
    elif setup.compile and workload not in ROLLOUTS:
        cmd += ["--compile"]
    if side == "trl" and best:
        cmd += ["--best"]
    if attn:
        cmd += ["--attn", attn]
    t0 = time.time()
    with logfile.open("w") as f:
        env = child_env(setup.threads, setup.device)
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{side} {workload} failed (exit {proc.returncode}); log {logfile}:\n{tail}")
    data = json.loads(result.read_text())
    amp = precision == "bf16"
    if data.get("mixed_precision") != precision or data.get("native_amp", amp) != amp:
        got = {k: data.get(k) for k in ("mixed_precision", "native_amp", "param_dtype")}
        raise SystemExit(f"{side} {workload}: asked for precision {precision}, the run used {got}; log {logfile}")
    if data.get("param_dtype", "torch.float32") != "torch.float32":
        raise SystemExit(f"{side} {workload}: weights are {data['param_dtype']}, not fp32 masters; log {logfile}")
    if data.get("device", "cpu").split(":")[0] != setup.device:
        got = data.get("device")
        raise SystemExit(f"{side} {workload}: asked for {setup.device}, the run used {got}; log {logfile}")
    data["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    data["process_s"] = time.time() - t0
    return data


def measure(data: dict, workload: str, seq_len: int) -> dict:
    """Per-run figures over the measured steps (step 1 skipped): mean step time from step-end timestamps."""
    ends = data["step_end_times"]
    durations = [b - a for a, b in zip(ends, ends[1:])]  # steps 2..N
    if not durations:
        raise SystemExit(f"{data['side']} {workload}: fewer than 2 steps recorded")
    step_s = sum(durations) / len(durations)
    fig = {"step_s": step_s, "rss": data["peak_rss_mib"]}
    if "peak_gpu_mib" in data:
        fig["gpu"] = data["peak_gpu_mib"]
    start = data.get("train_start", data.get("train_begin"))  # rlhf: before loading the models; TRL: train()
    if start:  # the warm-up step, any compile included
        fig["first_s"] = ends[0] - start
    if workload in ROLLOUTS:
        fig["throughput"] = EPISODES / step_s
        for k in ("time/generate", "time/score", "time/train"):
            if k in data:  # (TRL's GRPO is not split into phases)
                vals = data[k][1:]
                fig[k] = sum(vals) / len(vals)
    elif workload in VARLEN:  # the real tokens of steps 2..N over their time
        fig["throughput"] = sum(data["tokens"][1 : len(ends)]) / sum(durations)
    else:
        fig["throughput"] = SEQUENCES[workload] * seq_len / step_s
    return fig


def forward_flops(shape: dict, tokens: int, seqs: int, seq_len: int, head_tokens: int = 0) -> float:
    """Matmul FLOPs of one forward: the decoder's linears over `tokens`, causal attention (QK^T and AV over the lower
    triangle) over `seqs` sequences of `seq_len`, and an LM head over `head_tokens` (2 FLOPs per multiply-add)."""
    d, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    linears = 2 * tokens * layers * (4 * d * d + 3 * d * f)
    attention = seqs * layers * 2 * seq_len * seq_len * d
    return linears + attention + 2 * head_tokens * d * shape["vocab"]


def step_flops(shape: dict, workload: str) -> float:
    """Matmul FLOPs of one measured step of rlhf's computation (PPO: an iteration); training = 3x the forward."""
    L, P, R = shape["seq_len"], shape["prompt_len"], shape["new_tokens"]
    if workload in SEQUENCES:
        n = SEQUENCES[workload]
        return 3 * forward_flops(shape, n * L, n, L, head_tokens=n * L if workload == "sft" else 0)
    T, mini = P + R, 8
    generate = forward_flops(shape, EPISODES * P, EPISODES, P, EPISODES) + sum(
        forward_flops(shape, EPISODES, 0, 0, EPISODES)
        + EPISODES * shape["num_hidden_layers"] * 4 * t * shape["hidden_size"]
        for t in range(P + 1, T)
    )
    # old log-probs and reference log-probs (LM head over R + 1 positions), values, reward
    score = 2 * forward_flops(shape, EPISODES * T, EPISODES, T, EPISODES * (R + 1))
    score += 2 * forward_flops(shape, EPISODES * T, EPISODES, T)
    minibatches = 4 * EPISODES // mini  # 4 epochs
    policy = forward_flops(shape, mini * T, mini, T, mini * (R + 1))
    value = forward_flops(shape, mini * T, mini, T)
    return generate + score + minibatches * 3 * (policy + value)


def gemm_rate(precision: str, threads: int, shape: dict, device: str = "cpu") -> float:
    """This machine's best measured matmul rate (FLOP/s) in the precision's compute dtype on `device`: a large square
    product (and on a GPU a larger one) and the model's own MLP product at PPO's minibatch, best of all (an upper
    bound for any step's matmuls)."""
    dtype = "bfloat16" if precision == "bf16" else "float32"
    m = 8 * (shape["prompt_len"] + shape["new_tokens"])
    gpu = device == "cuda"
    code = f"""
import time, torch
sync = torch.cuda.synchronize if {gpu} else (lambda: None)
best = 0.0
sizes = [(2048, 2048, 2048), ({m}, {shape["hidden_size"]}, {shape["intermediate_size"]})]
sizes += [(8192, 8192, 8192)] * {int(gpu)}
for m, k, n in sizes:
    a = torch.randn(m, k, dtype=torch.{dtype}, device="{device}")
    b = torch.randn(k, n, dtype=torch.{dtype}, device="{device}")
    for _ in range(3):
        a @ b
    reps = max(3, int({1e13 if gpu else 2e10} / (2 * m * k * n)))
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
print(best)
"""
    env = child_env(threads, device)
    out = subprocess.run([str(RLHF_PY), "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip())


def floor_line(
    workload: str, shape: dict, rate: float, precision: str, figs: dict[str, list[dict]], device: str = "cpu"
) -> str:
    """The compute floor of a step: its matmul FLOPs at the best measured GEMM rate, and the throughput cap."""
    flops = step_flops(shape, workload)
    seconds = flops / rate
    cap = (EPISODES if workload == "ppo" else SEQUENCES[workload] * shape["seq_len"]) / seconds
    where = "GPU" if device == "cuda" else "CPU"
    line = (
        f"Compute floor ({PRECISION[precision]} matmuls): {flops / 1e9:.0f} GFLOP per "
        f"{'iteration' if workload == 'ppo' else 'step'} at this {where}'s best measured GEMM rate "
        f"({rate / 1e9:.0f} GFLOP/s) = {seconds:.3f} s, so at most {fmt(cap)} per s"
    )
    if "trl" in figs:
        trl = statistics.median(f["throughput"] for f in figs["trl"])
        line += f" = **{cap / trl:.2f}x** TRL's median with no time outside the matmuls"
    line += "."
    if "rlhf" in figs:
        step = statistics.median(f["step_s"] for f in figs["rlhf"])
        if seconds < 0.05 * step:  # a tiny model on a GPU: the floor says nothing about what bounds the step
            line += (
                f" The matmuls are {100 * seconds / step:.2g}% of rlhf's median step ({step:.3f} s): at this size the"
                " step is bound by the host (Python, kernel launches, synchronisations), not by its arithmetic."
            )
    return line


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}" if x >= 1 else f"{x:.3f}"


def table(workload: str, figs: dict[str, list[dict]], precision: dict[str, str], size: str) -> list[str]:
    units = {
        "ppo": "episodes/s",
        "ppovar": "episodes/s",
        "grpo": "completions/s",
        "sft": "tokens/s",
        "rm": "tokens/s",
        "rmk4": "unique tokens/s",
        "dpo": "tokens/s",
    }
    unit = units.get(workload, "real unique tokens/s" if workload == "rmk4var" else "real tokens/s")
    step = "s/iteration" if workload in ROLLOUTS else "s/step"
    labels = {side: "bf16" if p == "bf16" else "fp32" for side, p in precision.items()}
    same = len(set(labels.values())) == 1
    caption = next(iter(labels.values())) if same else ", ".join(f"{side} {label}" for side, label in labels.items())
    gpu = any("gpu" in f for runs in figs.values() for f in runs)
    lines = [
        f"| {workload} ({size}, {caption}) | {unit} min / median / max | {step} (median) | peak RSS MiB (median) |"
        + (" peak GPU MiB allocated (median) |" if gpu else "")
        + (" generate / score / train s (median) |" if workload.startswith("ppo") else ""),
        "|---|---|---|---|" + ("---|" if gpu else "") + ("---|" if workload.startswith("ppo") else ""),
    ]
    for name, runs in figs.items():
        side = name.split()[0]
        lo, med, hi = spread([f["throughput"] for f in runs])
        step_s = statistics.median(f["step_s"] for f in runs)
        row = f"| {name} ({labels[side]}) | {fmt(lo)} / **{fmt(med)}** / {fmt(hi)} | {fmt(step_s)} | "
        row += f"{statistics.median(f['rss'] for f in runs):,.0f} |"
        if gpu:
            row += f" {statistics.median(f.get('gpu', float('nan')) for f in runs):,.0f} |"
        if workload.startswith("ppo"):
            parts = [statistics.median(f[k] for f in runs) for k in ("time/generate", "time/score", "time/train")]
            row += " " + " / ".join(f"{p:.3g}" for p in parts) + " |"
        lines.append(row)
    if workload == "grpo":  # only rlhf's loop reports its phases
        for name, runs in figs.items():
            if all("time/train" in f for f in runs):
                parts = [statistics.median(f[k] for f in runs) for k in ("time/generate", "time/score", "time/train")]
                lines.append(f"\n{name}: generate / score / train s (median): {' / '.join(f'{p:.3g}' for p in parts)}")
    for ours, theirs in [(a, b) for a in figs if a.startswith("rlhf") for b in figs if b.startswith("trl")]:
        ratio = statistics.median(f["throughput"] for f in figs[ours]) / statistics.median(
            f["throughput"] for f in figs[theirs]
        )
        # the runs alternate, so run i of each side ran back to back: their ratio is the least touched by the
        # machine's drift over the minutes of a whole table
        pairs = sorted(r["throughput"] / t["throughput"] for r, t in zip(figs[ours], figs[theirs]))
        lines.append(
            f"\n{ours} / {theirs} throughput (ratio of medians): **{ratio:.2f}x**; run by run (each rlhf run against "
            f"the TRL run next to it): {' / '.join(f'{x:.2f}' for x in pairs)}x"
        )
    return lines


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{model}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.machine()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model and sequence size (default tiny)")
    ap.add_argument("--precision", choices=sorted(PRECISION), default="no", help="both sides: no = fp32 | bf16")
    ap.add_argument("--rlhf-precision", choices=sorted(PRECISION), help="rlhf's precision (default: --precision)")
    ap.add_argument("--trl-precision", choices=sorted(PRECISION), help="TRL's precision (default: --precision)")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma list of rlhf,trl (default both)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of " + ",".join(WORKLOADS))
    ap.add_argument("--reps", type=int, default=3, help="runs per side and workload (alternating)")
    ap.add_argument("--steps", type=int, default=0, help="measured steps per run (ppo 5, others 10; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="1 rep, 2 measured steps unless --steps: a smoke test")
    ap.add_argument("--threads", type=int, default=0, help="OMP/MKL threads for both sides (0 = torch default)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile on both sides: rlhf train.compile=true, TRL torch_compile=True (SFT, RM; not its PPO)",
    )
    ap.add_argument(
        "--rlhf-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an rlhf config override for every rlhf run (repeatable), e.g. train.compile=true",
    )
    ap.add_argument(
        "--attn",
        default="",
        metavar="IMPL",
        help="attn_implementation of every model on both sides (e.g. eager; default: each side's own)",
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides run (default cpu)")
    ap.add_argument(
        "--peer-python",
        type=Path,
        help="an interpreter with trl==1.12.0 to run TRL with, instead of building .venv-peer (a lent GPU machine)",
    )
    ap.add_argument(
        "--out",
        help=f"also write the tables (with how they were measured) to this markdown file, to replace the matching "
        f"section of {DOC.relative_to(ROOT)} (which keeps current tables only; git keeps the old ones)",
    )
    args = ap.parse_args()
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        raise SystemExit(f"unknown workload(s) {bad}; choose from {','.join(WORKLOADS)}")
    sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    if not sides or any(x not in SIDES for x in sides) or len(set(sides)) != len(sides):
        raise SystemExit(f"--sides {args.sides!r}: a comma list of {','.join(SIDES)}")
    sides = [x for x in SIDES if x in sides]  # rlhf first, then TRL
    precision = {"rlhf": args.rlhf_precision or args.precision, "trl": args.trl_precision or args.precision}
    precision = {side: precision[side] for side in sides}
    rlhf_sets = args.rlhf_set + (["train.compile=true"] if args.compile else [])
    size = SIZES[args.size]
    reps = 1 if args.quick else args.reps

    peer_py = args.peer_python or PEER_PY
    if "trl" in sides and args.peer_python is None:
        ensure_peer_venv()
    env = child_env(args.threads, args.device)
    gpu_name = ""
    if args.device == "cuda":
        code = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
        gpu_name = subprocess.run([str(RLHF_PY), "-c", code], capture_output=True, text=True, env=env).stdout.strip()
        if not gpu_name:
            raise SystemExit(f"--device cuda: {RLHF_PY} sees no CUDA device (torch.cuda.is_available() is False)")
    setup = Setup(args.size, args.threads, rlhf_sets, args.compile, args.attn, args.device, peer_py)
    (OUT / "runs").mkdir(parents=True, exist_ok=True)
    log(f"building the {args.size} world (tokenizer, random-init models, synthetic data) in {world_dir(args.size)}")
    subprocess.run(
        [str(RLHF_PY), ROOT / "scripts" / "peer" / "world.py", "--out", world_dir(args.size), "--size", args.size],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    shape = json.loads((world_dir(args.size) / "model.json").read_text())
    if (shape["seq_len"], shape["prompt_len"], shape["new_tokens"]) != (size["L"], size["P"], size["R"]):
        raise SystemExit(f"{world_dir(args.size)}/model.json {shape} does not match --size {args.size} {size}")
    versions = f"torch {rlhf_version('torch', RLHF_PY)}, transformers {rlhf_version('transformers', RLHF_PY)}"
    if "trl" in sides:
        versions += f" (peer: {rlhf_version('transformers', peer_py)}), trl {rlhf_version('trl', peer_py)}"
    prec = " / ".join(f"{side} {PRECISION[precision[side]]}" for side in sides)
    header = (
        f"{datetime.date.today().isoformat()}, size {args.size} ({shape['params'] / 1e6:.2f}M parameters; "
        f"L {size['L']}, PPO {size['P']}-token prompts + {size['R']} new tokens), precision: {prec}; "
        f"{gpu_name + ' on ' if gpu_name else ''}{machine()}; {versions}; "
        f"threads {args.threads or 'torch default'}; {reps} rep(s) per side"
        + (f"; rlhf with {', '.join(rlhf_sets)}" if rlhf_sets and "rlhf" in sides else "")
        + (
            "; TRL with torch_compile=True (SFT, RM; its PPO cannot compile)"
            if args.compile and "trl" in sides
            else ""
        )
        + (f"; attn_implementation={args.attn} on both sides" if args.attn else "")
        + (" (--quick: rough)" if args.quick else "")
    )
    log(header)
    out_lines = [header, ""]
    rates: dict[str, float] = {}
    tag = (
        f"{args.size}-"
        + "-".join(f"{side}_{precision[side]}" for side in sides)
        + ("-compile" if args.compile else "")
    )
    report = OUT / f"report-{tag}.md"
    for w in workloads:
        measured = args.steps or (2 if args.quick else 5 if w.startswith("ppo") else 10)  # grpo: one step per rollout
        runs = variants(w, sides)
        figs: dict[str, list[dict]] = {variant_label(side, best, w): [] for side, best in runs}
        for rep in range(reps):
            for side, best in runs:
                name = variant_label(side, best, w)
                log(f"{w}: {name} ({PRECISION[precision[side]]}) run {rep + 1}/{reps}: 1 warm-up, {measured} measured")
                data = run_worker(side, w, measured + 1, rep, precision[side], setup, best)
                fig = measure(data, w, size["L"])
                figs[name].append(fig)
                first = f", first step {fig['first_s']:.1f} s" if "first_s" in fig else ""
                log(
                    f"{w}: {name}: {fmt(fig['throughput'])} per s, {fig['step_s']:.3f} s/step, "
                    f"{fig['rss']:.0f} MiB{first}"
                )
        lines = table(w, figs, precision, args.size)
        if "rlhf" in precision and w in ("ppo", "sft", "rm", "rmk4"):  # the floor of a fixed-length step
            if precision["rlhf"] not in rates:
                rates[precision["rlhf"]] = gemm_rate(precision["rlhf"], args.threads, shape, args.device)
            rate = rates[precision["rlhf"]]
            lines += ["", floor_line(w, shape, rate, precision["rlhf"], figs, args.device)]
        print("\n" + "\n".join(lines) + "\n", flush=True)
        out_lines += lines + [""]
        # after every workload, so a run stopped part-way (a lent machine's time limit) keeps what it measured
        report.write_text("\n".join(out_lines) + "\n")
        log(f"wrote {report.relative_to(ROOT)}")
    if args.out:
        write_tables(Path(args.out), out_lines)


def write_tables(path: Path, lines: list[str]) -> None:
    """The run's tables under the section heading and its method notes, ready to replace that section."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{HEADING}\n\n{NOTES}\n\n### " + "\n".join(lines).rstrip() + "\n")
    log(f"wrote {path}: replace the section {HEADING!r} of {DOC.relative_to(ROOT)} with it")


NOTES = """\
`scripts/bench_peer.py` runs rlhf (its public path: `load_config` + the stage's `train()`) and TRL 1.12.0 (in its own
`.venv-peer`, same torch) on identical workloads on CPU: a random-init Llama, vocabulary 568, word-level synthetic
data with exact lengths, in two sizes (`--size`): **tiny**, 3.46M parameters (4 layers, d 256, 4 heads, MLP 688),
sequences L = 128, PPO prompts P = 32 + R = 32 new tokens; **small**, 25.9M parameters (8 layers, d 512, 8 heads,
MLP 1376, 256-token context), L = 256, P = 64 + R = 192. Each table's heading names its size and precision.
Each run is a fresh process, rlhf and TRL alternate; the first step of each run is warm-up. Throughput is per
measured step, wall time between step ends (all per-step overhead of each loop included); peak RSS is the whole
process's.
Precision (`--precision`, or `--rlhf-precision` / `--trl-precision`): fp32 (`no`, the default) or bf16 autocast with
fp32 master weights on both sides (rlhf `train.mixed_precision=bf16`; TRL `bf16=True`, and for PPO also
`ACCELERATE_MIXED_PRECISION=bf16`, as `accelerate launch --mixed_precision bf16` sets, because TRL 1.12's PPOTrainer
builds its own Accelerator without the config's precision). Both autocast through accelerate (torch.autocast on
CPU, outputs back to fp32); the weights stay fp32, which each run checks. Not the same coverage in PPO: rlhf
autocasts generation, the rollout forwards and training; TRL only the training forwards (its generation and its
reference / value / reward rollout forwards stay fp32), so PPO's generate and score columns compare fp32 TRL with
bf16 rlhf.
PPO: 32 episodes/iteration, P-token prompts, R new tokens at temperature 1 (EOS stops and truncates on both sides;
a random-init model over 568 tokens seldom emits it, about 1 response in 18 in 32 tokens, 1 in 3.5 in 192, and a
batch decodes until every response has ended, so every iteration decodes R steps), 4 epochs x 4 minibatches of 8,
KL coef 0.05 (k1), no ptx, no gradient clipping (TRL's PPO loop has none). TRL's score column is everything between
generation and the first training forward (rollout forwards, rewards, advantages); TRL takes the policy's old
log-probs from generate()'s scores, rlhf runs a separate forward. SFT: 8 x L tokens, completion-only loss, no
packing. RM: 8 pairs x L tokens. RM K=4: 8 prompts x 4 responses x L tokens, counted as unique tokens (rlhf forwards
each response once; TRL trains on the 6 pairs per prompt, 48 pairs, each response forwarded 3 times).
`--compile`: torch.compile on both sides (rlhf `train.compile=true`, TRL `torch_compile=True` for SFT and RM; TRL
1.12's PPOTrainer builds its own Accelerator with no compile path, so its PPO stays eager); the log gives each
run's first step, compile included. `--attn IMPL`: every model of both sides loaded with that attn_implementation
(like for like when one side's setting is not the default). Under each table, the compute floor: the step's matmul
FLOPs, counted from the model's shape (decoder linears, causal attention, LM head where logits are taken; training =
3x the forward; PPO: generation, the four scoring forwards, 16 minibatch updates of policy and value), at the best
matmul rate this CPU measures in that precision (a 2048^3 product or the model's MLP product at PPO's minibatch): no
implementation of the same computation can run faster."""


if __name__ == "__main__":
    main()
