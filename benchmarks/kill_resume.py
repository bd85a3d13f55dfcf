"""Kill training at random steps, resume it each time, and check that it ends bit-identical to an uninterrupted run.

For each data-loader setting (``--workers``, default 0 and 2), trains a small Lite-DINO (KDA, denoising
queries: random noise drawn every step) on a synthetic dataset through ``litedetr train`` twice: once
straight through, and once interrupted ``--kills`` times at random steps, each interruption followed by
``litedetr train --resume``. The interruptions cycle through the three ways jobs die:

- ``SIGKILL`` to the training process (out of memory, a pre-empted node): nothing is saved, the run
  resumes from its last periodic checkpoint (``--checkpoint-every``) and redoes the steps after it
  (killed before its first checkpoint, it is started again without ``--resume``);
- ``SIGTERM`` to the training process (``kill``): the run finishes its step, saves and exits;
- ``SIGTERM`` to its whole process group, data-loader workers included (``timeout``, ``docker stop``,
  Slurm).

The interrupted run must end with parameters, optimiser state and step equal bit for bit to the
straight run's, and its log must hold every step once, with the straight run's losses. Writes
``kill_resume.md`` and ``kill_resume.json`` to ``--out``; the runs go to ``--runs``.

    python benchmarks/kill_resume.py [--kills 10] [--workers 0 2] [--seed 0] [--runs kill-resume-runs] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from litedetr.data import SyntheticSpec, write_synthetic_dataset
from litedetr.engine.run_log import read_log
from litedetr.engine.state import load_state

MODEL = "lite-dino-r18-tiny-h3l1-2x3"
DATA = SyntheticSpec(num_train=16, num_val=4, image_size=(64, 64), max_objects=3, seed=0)
EPOCHS, BATCH = 4, 1
STEPS = EPOCHS * DATA.num_train // BATCH
KINDS = ("SIGKILL", "SIGTERM", "SIGTERM to the group")
TIMEOUT_S = 900


def command(data: Path, out: Path, workers: int, checkpoint_every: int, resume: bool) -> list[str]:
    return [
        sys.executable, "-m", "litedetr.cli", "train", "--quiet", "--model", MODEL, "--data", str(data), "--epochs", str(EPOCHS),
        "--batch-size", str(BATCH), "--image-sizes", "64", "--max-size", "64", "--workers", str(workers), "--deterministic",
        "--checkpoint-every", str(checkpoint_every), "--eval-every", str(EPOCHS), "--out", str(out),
    ] + (["--resume"] if resume else [])  # fmt: skip


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_to_end(args: list[str]) -> None:
    result = subprocess.run(args, env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")


def interrupt(args: list[str], out: Path, kind: str, at_step: int) -> dict[str, Any]:
    """Start ``args``, deliver ``kind`` once ``at_step`` steps are logged, wait for the exit."""
    process = subprocess.Popen(args, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT_S
    while len(read_log(out, "train")) < at_step and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if process.poll() is not None or len(read_log(out, "train")) < at_step:
        process.kill()
        raise SystemExit(f"the run logged {len(read_log(out, 'train'))} of {at_step} steps before it ended:\n{process.communicate()[1][-3000:]}")
    if kind == "SIGKILL":
        process.kill()
    elif kind == "SIGTERM":
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=TIMEOUT_S)
    expected = -signal.SIGKILL if kind == "SIGKILL" else 130
    if process.returncode != expected or "Traceback" in stderr:
        raise SystemExit(f"{kind} at step {at_step}: exit code {process.returncode}, expected {expected}:\n{stderr[-3000:]}")
    checkpoint = out / "checkpoint.pt"  # none yet: killed before the first one, the run starts again
    return {"kind": kind, "at_step": at_step, "resumes_from": load_state(checkpoint)["step"] if checkpoint.exists() else 0}


def compare(straight: Path, resumed: Path) -> dict[str, Any]:
    """What must be equal bit for bit between the two runs."""
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a, state_b = load_state(straight / "checkpoint.pt"), load_state(resumed / "checkpoint.pt")
    moments = [(sa, sb) for sa, sb in zip(state_a["optimizer"]["state"].values(), state_b["optimizer"]["state"].values())]
    optimizer = len(state_a["optimizer"]["state"]) == len(state_b["optimizer"]["state"]) and all(
        torch.equal(sa[key], sb[key]) for sa, sb in moments for key in sa
    )
    steps_a, steps_b = read_log(straight, "train"), read_log(resumed, "train")
    log = [r["step"] for r in steps_b] == list(range(1, STEPS + 1)) and [r["loss"] for r in steps_a] == [r["loss"] for r in steps_b]
    return {"weights": weights, "optimizer": optimizer, "step": state_a["step"] == state_b["step"] == STEPS, "log": log}


def trial(data: Path, runs: Path, workers: int, kills: int, checkpoint_every: int, rng: random.Random) -> dict[str, Any]:
    straight, resumed = runs / f"workers{workers}-straight", runs / f"workers{workers}-killed"
    for folder in (straight, resumed):
        shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    run_to_end(command(data, straight, workers, checkpoint_every, resume=False))
    # at least 2 steps apart: a stopped run has logged up to one step past its interruption, and the next
    # interruption must fall on a step the resumed process logs itself
    at_steps = [step + 2 * i for i, step in enumerate(sorted(rng.sample(range(1, STEPS - 2 * (kills - 1)), kills)))]
    interruptions: list[dict[str, Any]] = []
    for index, at_step in enumerate(at_steps):
        resume = bool(interruptions) and interruptions[-1]["resumes_from"] > 0
        interruptions.append(interrupt(command(data, resumed, workers, checkpoint_every, resume), resumed, KINDS[index % len(KINDS)], at_step))
    run_to_end(command(data, resumed, workers, checkpoint_every, resume=interruptions[-1]["resumes_from"] > 0))
    equal = compare(straight, resumed)
    return {
        "workers": workers,
        "interruptions": interruptions,
        "equal": equal,
        "identical": all(equal.values()),
        "seconds": round(time.perf_counter() - started, 1),
    }


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"`{MODEL}` (KDA, denoising), {STEPS} steps of batch {BATCH} at 64x64 ({EPOCHS} epochs of {DATA.num_train} synthetic"
        f" images), `--deterministic`, a checkpoint every {meta['checkpoint_every']} steps; seed {meta['seed']}; {meta['cpu']}, torch {meta['torch']}."
        " Each interruption is followed by `litedetr train --resume`; the run then ends and is compared with an uninterrupted one.",
        "",
        "| data-loader workers | interruptions (kind at step -> resumed from step) | weights | optimiser | step | log | bit-identical |",
        "|---:|---|:-:|:-:|:-:|:-:|:-:|",
    ]
    mark = {True: "equal", False: "**differs**"}
    for r in results:
        kills = "; ".join(f"{i['kind']} at {i['at_step']} -> {i['resumes_from']}" for i in r["interruptions"])
        e = r["equal"]
        lines.append(
            f"| {r['workers']} | {kills} | {mark[e['weights']]} | {mark[e['optimizer']]} | {mark[e['step']]} | {mark[e['log']]} "
            f"| {'yes' if r['identical'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="interruptions per run, at distinct random steps")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data-loader workers, one trial each")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="steps between periodic checkpoints (what SIGKILL falls back to)")
    parser.add_argument("--seed", type=int, default=0, help="draws the steps at which the run is interrupted")
    parser.add_argument("--runs", type=Path, default=Path("kill-resume-runs"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not 1 <= args.kills <= STEPS // 3:
        parser.error(f"--kills must lie in [1, {STEPS // 3}]: the run has {STEPS} steps, and interruptions fall at least 2 apart")
    data = write_synthetic_dataset(args.runs / "data", DATA)
    rng = random.Random(args.seed)
    results = []
    for workers in args.workers:
        results.append(trial(data, args.runs, workers, args.kills, args.checkpoint_every, rng))
        print(f"workers {workers}: {'bit-identical' if results[-1]['identical'] else 'DIFFERS'} ({results[-1]['seconds']} s)", flush=True)
    meta = {
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
        "torch": torch.__version__,
        "cpu": f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores",
    }
    table = markdown(results, meta)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kill_resume.md").write_text(table)
    (args.out / "kill_resume.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    if not all(r["identical"] for r in results):
        raise SystemExit("a resumed run differs from the uninterrupted one")


if __name__ == "__main__":
    main()
