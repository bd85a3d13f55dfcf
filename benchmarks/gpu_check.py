"""One GPU check: native Triton tests, the attention kernels, whole models, their encoders and a training step.

On one CUDA GPU (H100/H200 class), within a time budget (default 8 minutes, start-up included):

1. ``triton_tests``: ``pytest tests/ops/test_triton.py`` in a child process without ``TRITON_INTERPRET``;
   pass/fail counts from its JUnit report.
2. ``kernels``: MSDA, and KDA with shared and with distinct keys, at the token shapes of an 800x1333
   image (d 256, 8 heads, 4 levels, 4 points, batch 1), fp32 and bf16: ours (Triton), our PyTorch op,
   and for KDA the two-pass way (:mod:`litedetr.bench.attention`); forward and forward +
   backward, latency and peak memory.
3. ``inference``: ``dino-r50``, ``lite-dino-r50-h3l1-2x3`` and ``lite-dino-r50-h2l2-2x3`` (random
   weights) on 800x1333 images, batch 1 and 8, fp32 and bf16 autocast, eager: the whole model
   (images/s, p50/p90 latency, peak memory) and its encoder alone on the input stage's tokens.
4. ``train_step``: one bf16-autocast training step (forward, backward, AdamW step) of each model, batch 2.
5. ``inference_compiled``: the whole models under ``torch.compile`` (bf16 batch 8 first; the first
   call, compilation included, is reported apart). Last, since compiling takes the longest.

Each section, and each row in it, records its error and the script goes on. Once the budget is
spent, the remaining rows and sections are skipped with a note (a timer interrupts the row then
running). Writes ``gpu_check.json`` and ``gpu_check.md`` (the tables, with the ratios: KDA fwd+bwd
vs two-pass speed and memory, MSDA vs the PyTorch op, Lite-DINO vs DINO images/s and encoder
latency) under ``--out``, and prints the tables.

``--dry-run`` runs it all on the CPU with tiny sizes (64x96 images, the ``*-r18-tiny`` models, batch
2, tiny levels for the kernels, ``torch.compile`` with the ``eager`` backend on one model, only
the Triton test that needs no kernels) and writes ``gpu_check_dry_run.{json,md}``.

    python benchmarks/gpu_check.py [--budget-minutes 8] [--out benchmarks/results]
    python benchmarks/gpu_check.py --dry-run [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from gpu_check_report import markdown, summary  # benchmarks/, this script's folder

from litedetr.bench.attention import LEVELS_800X1333, kernel_cases, kernel_row
from litedetr.bench.timing import Timing, bench_images, bench_model, encoder_run, measure, model_run, time_calls, train_step_run
from litedetr.ops import attention_backend, custom_ops

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
TRITON_TESTS_TIMEOUT_S = 240
TRAIN_BATCH = 2
Row = dict[str, Any]


@dataclass(frozen=True)
class ModelSpec:
    label: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """What one run measures; :data:`GPU_PLAN` on the GPU, :data:`DRY_RUN_PLAN` on the CPU."""

    device: str
    size: tuple[int, int]
    models: tuple[ModelSpec, ...]  # the first is the baseline of the ratios
    batches: tuple[int, ...]
    repeats: int
    warmup: int
    kernel_levels: tuple[tuple[int, int], ...]
    kernel_repeats: int
    kernel_warmup: int
    train_repeats: int
    compile_backend: str
    compiled: tuple[tuple[str, str, int], ...]  # (model label, precision, batch), in order of priority
    pytest_args: tuple[str, ...] = ()


_R50 = (
    ModelSpec("dino-r50", "dino-r50"),
    ModelSpec("lite-dino-r50-h3l1-2x3", "lite-dino-r50-h3l1-2x3"),
    ModelSpec("lite-dino-r50-h2l2-2x3", "lite-dino-r50-h2l2-2x3"),
)
GPU_PLAN = Plan(
    device="cuda",
    size=(800, 1333),
    models=_R50,
    batches=(1, 8),
    repeats=10,
    warmup=2,
    kernel_levels=LEVELS_800X1333,
    kernel_repeats=20,
    kernel_warmup=3,
    train_repeats=5,
    compile_backend="inductor",
    compiled=tuple((m.label, p, b) for p, b in (("bf16", 8), ("fp32", 8), ("bf16", 1), ("fp32", 1)) for m in _R50),
)
_TINY = (
    ModelSpec("dino-r18-tiny", "dino-r18-tiny"),
    ModelSpec("lite-dino-r18-tiny-h3l1-2x3", "lite-dino-r18-tiny-h3l1-2x3"),
    ModelSpec("lite-dino-r18-tiny-h2l2-2x3", "lite-dino-r18-tiny-h3l1-2x3", {"encoder": {"n_high": 2}}),
)
DRY_RUN_PLAN = Plan(
    device="cpu",
    size=(64, 96),
    models=_TINY,
    batches=(2,),
    repeats=2,
    warmup=0,
    kernel_levels=((8, 12), (4, 6), (2, 3), (1, 2)),
    kernel_repeats=1,
    kernel_warmup=0,
    train_repeats=1,
    compile_backend="eager",
    compiled=(("lite-dino-r18-tiny-h3l1-2x3", "fp32", 1),),
    pytest_args=("-k", "without_triton"),
)


class BudgetExceeded(Exception):
    """Raised by :class:`Budget`'s timer in whatever row is running when the budget is spent."""


class Budget:
    """A deadline; inside ``with budget:`` a timer raises :class:`BudgetExceeded` when it passes."""

    def __init__(self, seconds: float, start: float) -> None:
        self.seconds, self.deadline = seconds, start + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def _expire(self, signum: int, frame: object) -> None:
        raise BudgetExceeded(f"the time budget of {self.seconds / 60:.2f} min ran out")

    def __enter__(self) -> Budget:
        self._previous = signal.signal(signal.SIGALRM, self._expire)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 1e-3))
        return self

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_rows(items: Iterable[Row], measure_row: Callable[[Row], Row], budget: Budget) -> list[Row]:
    """``item | measure_row(item)`` per item; an error is recorded as the row's ``error``, and once the budget is spent the rest are ``skipped``."""
    rows = []
    for item in items:
        if budget.left() <= 0:
            rows.append({**item, "skipped": "time budget spent"})
            continue
        try:
            rows.append({**item, **measure_row(item)})
        except Exception as error:  # noqa: BLE001 - one failing row must not stop the check
            rows.append({**item, "error": f"{type(error).__name__}: {error}"})
        finally:
            _free_memory()
    return rows


def run_section(produce: Callable[[], Row], budget: Budget) -> Row:
    """``produce()`` with its status (``ok``, ``partial``, ``error``, ``skipped``), seconds and any error message."""
    if budget.left() <= 0:
        return {"status": "skipped", "note": "time budget spent before this section"}
    start = time.monotonic()
    try:
        result = produce()
    except Exception as error:  # noqa: BLE001 - one failing section must not stop the check
        result = {"error": f"{type(error).__name__}: {error}"}
    rows = result.get("rows", [])
    status = "error" if "error" in result else "partial" if any("error" in r or "skipped" in r for r in rows) else "ok"
    return {"status": status, "seconds": time.monotonic() - start, **result}


def _junit_counts(report: Path) -> Row:
    """Counts, and ``name: first line of the message`` of every failing test, from a pytest JUnit report."""
    suite = ET.parse(report).getroot().find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in suite.iter("testcase"):
        for bad in case:
            if bad.tag in ("failure", "error"):
                message = (bad.get("message") or bad.tag).strip().splitlines() or [bad.tag]
                failures.append(f"{case.get('name')}: {message[0][:300]}")
    return {
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "failures": failures,
    }


def triton_tests(plan: Plan, budget: Budget) -> Row:
    """``pytest tests/ops/test_triton.py`` in a child without ``TRITON_INTERPRET`` (at most 4 minutes): counts from its JUnit report."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    command = ["pytest", "tests/ops/test_triton.py", *plan.pytest_args]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        child = [sys.executable, "-m", *command, "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        timeout = max(min(budget.left(), TRITON_TESTS_TIMEOUT_S), 1)
        proc = subprocess.run(child, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        result = {"command": " ".join(command), "returncode": proc.returncode}
        if report.exists():
            result.update(_junit_counts(report))
    if proc.returncode != 0:
        result["error"] = f"pytest exited with {proc.returncode}: {result.get('failed', '?')} failed, {result.get('errors', '?')} errors"
        result["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return result


def _timing_fields(prefix: str, timing: Timing, batch: int) -> Row:
    return {
        f"{prefix}_p50_ms": timing.median_s * 1e3,
        f"{prefix}_p90_ms": timing.p90_s * 1e3,
        f"{prefix}_images_per_s": batch / timing.median_s,
        f"{prefix}_peak_mib": timing.peak_memory_bytes / 2**20,
    }


class Models:
    """Builds each model of the plan once while its rows run (one model alive at a time)."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.specs = plan, {m.label: m for m in plan.models}
        self.label: str | None = None
        self.model: torch.nn.Module | None = None

    def get(self, label: str) -> Any:
        if label != self.label:
            self.model = None
            _free_memory()
            spec = self.specs[label]
            self.model, self.label = bench_model(spec.preset, self.plan.size, self.plan.device, **spec.overrides).eval(), label
        return self.model


def _model_items(plan: Plan) -> list[Row]:
    return [{"model": m.label, "precision": p, "batch": b} for m in plan.models for p in PRECISIONS for b in plan.batches]


def inference(plan: Plan, budget: Budget) -> Row:
    """Eager inference of the whole model and of its encoder alone, per model, precision and batch."""
    models, device = Models(plan), torch.device(plan.device)

    def row(item: Row) -> Row:
        model, amp = models.get(item["model"]), PRECISIONS[item["precision"]]
        images = bench_images(item["batch"], plan.size, device)
        whole = measure(model_run(model, images, autocast=amp), device, plan.repeats, plan.warmup)
        encoder = measure(encoder_run(model, images, False, autocast=amp), device, plan.repeats, plan.warmup)
        attention = attention_backend(torch.empty(0, device=device, dtype=amp or torch.float32))
        return {"attention": attention, **_timing_fields("model", whole, item["batch"]), **_timing_fields("encoder", encoder, item["batch"])}

    return {"rows": run_rows(_model_items(plan), row, budget)}


def inference_compiled(plan: Plan, budget: Budget) -> Row:
    """Inference of ``torch.compile``'d models (static shapes, one compilation per row); ``first_call_s`` includes compiling."""
    models, device = Models(plan), torch.device(plan.device)

    def row(item: Row) -> Row:
        torch.compiler.reset()
        compiled = torch.compile(models.get(item["model"]), backend=plan.compile_backend, dynamic=False)
        run = model_run(compiled, bench_images(item["batch"], plan.size, device), autocast=PRECISIONS[item["precision"]])
        first = time_calls(run, device, repeats=1, warmup=0)[0]
        return {"first_call_s": first, **_timing_fields("model", measure(run, device, plan.repeats, plan.warmup), item["batch"])}

    items = [{"model": m, "precision": p, "batch": b} for m, p, b in plan.compiled]
    return {"backend": plan.compile_backend, "rows": run_rows(items, row, budget)}


def train_step(plan: Plan, budget: Budget) -> Row:
    """One bf16-autocast training step (forward, backward, AdamW step) per model; peak memory beyond weights, optimiser state and inputs."""
    device = torch.device(plan.device)
    specs = {m.label: m for m in plan.models}

    def row(item: Row) -> Row:
        spec = specs[item["model"]]
        model = bench_model(spec.preset, plan.size, device, **spec.overrides).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
        step = train_step_run(model, bench_images(item["batch"], plan.size, device), optimizer, autocast=torch.bfloat16)
        return _timing_fields("step", measure(step, device, plan.train_repeats, plan.warmup), item["batch"])

    items = [{"model": m.label, "precision": "bf16", "batch": TRAIN_BATCH} for m in plan.models]
    return {"rows": run_rows(items, row, budget)}


def kernels(plan: Plan, budget: Budget) -> Row:
    """The attention ops at batch 1 in fp32 and bf16 (:func:`litedetr.bench.attention.kernel_row`)."""
    device = torch.device(plan.device)
    cases = {(c.op, c.method, str(c.dtype).removeprefix("torch.")): c for c in kernel_cases([1], [torch.float32, torch.bfloat16])}
    items = [{"op": op, "method": method, "batch": 1, "dtype": dtype} for op, method, dtype in cases]

    def row(item: Row) -> Row:
        return kernel_row(cases[item["op"], item["method"], item["dtype"]], plan.kernel_levels, device, plan.kernel_repeats, plan.kernel_warmup)

    return {"levels": [list(level) for level in plan.kernel_levels], "rows": run_rows(items, row, budget)}


SECTIONS: dict[str, Callable[[Plan, Budget], Row]] = {
    "triton_tests": triton_tests,
    "kernels": kernels,
    "inference": inference,
    "train_step": train_step,
    "inference_compiled": inference_compiled,
}


def run_check(plan: Plan, budget: Budget) -> Row:
    """Every section in order, each under :func:`run_section`; those the budget left out are ``skipped``."""
    sections: Row = {}
    try:
        with budget:
            for name, section in SECTIONS.items():
                sections[name] = run_section(lambda section=section: section(plan, budget), budget)
    except BudgetExceeded:
        pass
    skipped = {"status": "skipped", "note": "time budget spent before this section"}
    return {name: sections.get(name, skipped) for name in SECTIONS}


def _meta(plan: Plan, args: argparse.Namespace, elapsed_s: float) -> Row:
    cuda = plan.device == "cuda"
    return {
        "dry_run": args.dry_run,
        "device": plan.device,
        "device_name": torch.cuda.get_device_name() if cuda else "CPU",
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton") if custom_ops.TRITON_AVAILABLE else None,
        "triton_enabled": custom_ops.triton_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "size": list(plan.size),
        "models": [{"label": m.label, "preset": m.preset, "overrides": m.overrides} for m in plan.models],
        "repeats": plan.repeats,
        "warmup": plan.warmup,
        "budget_minutes": args.budget_minutes,
        "elapsed_s": elapsed_s,
    }


def main() -> None:
    start = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="time budget from start-up; sections after it are skipped (default 8)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder of the JSON and Markdown reports")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with tiny sizes, to gpu_check_dry_run.{json,md}")
    args = parser.parse_args()
    plan = DRY_RUN_PLAN if args.dry_run else GPU_PLAN
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_check.py needs a CUDA GPU (or --dry-run on the CPU)")
    if not args.dry_run and os.environ.get("TRITON_INTERPRET"):
        sys.exit("TRITON_INTERPRET is set: the kernels would run in Triton's interpreter; unset it")

    sections = run_check(plan, Budget(args.budget_minutes * 60, start))
    result = {"meta": _meta(plan, args, time.monotonic() - start), "sections": sections, "summary": summary(sections, plan.models[0].label)}
    report = markdown(result)
    print(report)
    stem = "gpu_check_dry_run" if args.dry_run else "gpu_check"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(report)
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
