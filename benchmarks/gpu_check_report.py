"""The ratios and the Markdown report of ``benchmarks/gpu_check.py`` (from its sections' rows).

Ratios (each within one run):

- kernels: for every op and dtype, ``ours`` against each other method: ``fwd_speedup`` and
  ``fwd_bwd_speedup`` (the other's latency / ours: above 1, ours is faster) and
  ``fwd_bwd_memory_ratio`` (our peak memory / the other's: below 1, ours needs less);
- models: each model against the baseline (the plan's first model, DINO) at the same precision and
  batch: ``images_per_s_ratio`` (eager) and ``compiled_images_per_s_ratio`` (model / baseline: above
  1, faster), ``encoder_latency_ratio`` (model / baseline: below 1, faster);
- training: ``step_latency_ratio`` and ``step_peak_memory_ratio`` (model / baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from litedetr.bench.attention import kernel_markdown

Row = dict[str, Any]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _measured(section: Row, *keys: str) -> dict[tuple, Row]:
    """The section's rows that ran, by ``keys``."""
    return {tuple(r[k] for k in keys): r for r in section.get("rows", []) if "error" not in r and "skipped" not in r}


def kernel_ratios(kernels: Row) -> list[Row]:
    rows = _measured(kernels, "op", "method", "dtype")
    ratios = []
    for (op, method, dtype), other in rows.items():
        ours = rows.get((op, "ours", dtype))
        if method == "ours" or ours is None:
            continue
        ratios.append(
            {
                "op": op,
                "dtype": dtype,
                "versus": method,
                "fwd_speedup": _ratio(other["fwd_ms"], ours["fwd_ms"]),
                "fwd_bwd_speedup": _ratio(other["fwd_bwd_ms"], ours["fwd_bwd_ms"]),
                "fwd_bwd_memory_ratio": _ratio(ours["fwd_bwd_peak_mib"], other["fwd_bwd_peak_mib"]),
            }
        )
    return ratios


def model_ratios(inference: Row, compiled: Row, baseline: str) -> list[Row]:
    eager, fast = _measured(inference, "model", "precision", "batch"), _measured(compiled, "model", "precision", "batch")
    ratios = []
    for (model, precision, batch), row in eager.items():
        base = eager.get((baseline, precision, batch))
        if model == baseline or base is None:
            continue
        pair = fast.get((model, precision, batch)), fast.get((baseline, precision, batch))
        ratios.append(
            {
                "model": model,
                "baseline": baseline,
                "precision": precision,
                "batch": batch,
                "images_per_s_ratio": _ratio(row["model_images_per_s"], base["model_images_per_s"]),
                "compiled_images_per_s_ratio": _ratio(*(None if r is None else r["model_images_per_s"] for r in pair)),
                "encoder_latency_ratio": _ratio(row["encoder_p50_ms"], base["encoder_p50_ms"]),
            }
        )
    return ratios


def train_ratios(train: Row, baseline: str) -> list[Row]:
    rows = _measured(train, "model")
    base = rows.get((baseline,))
    return [
        {
            "model": model,
            "baseline": baseline,
            "step_latency_ratio": _ratio(row["step_p50_ms"], base["step_p50_ms"]),
            "step_peak_memory_ratio": _ratio(row["step_peak_mib"], base["step_peak_mib"]),
        }
        for (model,), row in rows.items()
        if base is not None and model != baseline
    ]


def summary(sections: Row, baseline: str) -> Row:
    """Every ratio of the module docstring, from the sections that ran."""
    return {
        "kernels": kernel_ratios(sections.get("kernels", {})),
        "models": model_ratios(sections.get("inference", {}), sections.get("inference_compiled", {}), baseline),
        "train_step": train_ratios(sections.get("train_step", {}), baseline),
    }


def _cell(x: object) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def table(rows: Sequence[Row], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of the ``rows`` that ran, with ``(key, header)`` columns (the others are listed at the end of the report)."""
    ran = [row for row in rows if "error" not in row and "skipped" not in row]
    if not ran:
        return "(no rows)"
    numeric = [all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in ran) for key, _ in columns]
    lines = ["| " + " | ".join(header for _, header in columns) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |" for row in ran]
    return "\n".join(lines)


def _not_run(sections: Row) -> list[str]:
    """One line per section or row that failed or was skipped, with the reason."""
    notes = []
    for name, section in sections.items():
        if section["status"] in ("error", "skipped"):
            notes.append(f"- {name}: {section['status']}: {section.get('error') or section.get('note')}")
        for row in section.get("rows", []):
            if "error" in row or "skipped" in row:
                ident = ", ".join(f"{v}" for k, v in row.items() if k not in ("error", "skipped"))
                notes.append(f"- {name} ({ident}): {row.get('error') or 'skipped: ' + row['skipped']}")
    return notes


MODEL_COLUMNS = [("model", "model"), ("precision", "precision"), ("batch", "batch")]


def markdown(result: Row) -> str:
    """The report: the run's setting, then one table per section and the ratios."""
    meta, sections, ratios = result["meta"], result["sections"], result["summary"]
    size = "x".join(str(v) for v in meta["size"])
    lines = [
        f"# litedetr GPU check{' (dry run on the CPU, tiny sizes)' if meta['dry_run'] else ''}",
        "",
        (
            f"{meta['device_name']}; torch {meta['torch']}, triton {meta['triton']}; images {size}; "
            f"{meta['elapsed_s']:.0f} s of a {meta['budget_minutes']:g} min budget; random weights."
        ),
    ]
    tests = sections["triton_tests"]
    lines += ["", "## Triton tests (not interpreted)", "", f"`{tests.get('command', 'pytest tests/ops/test_triton.py')}`: {tests['status']}"]
    if "passed" in tests:
        lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped")
        lines += [f"- {failure}" for failure in tests["failures"]]
    kernels = sections["kernels"]
    measured = [r for r in kernels.get("rows", []) if "error" not in r and "skipped" not in r]
    lines += ["", "## Deformable attention, batch 1, levels " + ", ".join(f"{h}x{w}" for h, w in kernels.get("levels", [])), ""]
    lines += [kernel_markdown(measured) if measured else "(no rows)", ""]
    lines += [
        table(
            ratios["kernels"],
            [
                ("op", "op"),
                ("dtype", "dtype"),
                ("versus", "ours vs"),
                ("fwd_speedup", "fwd speed-up"),
                ("fwd_bwd_speedup", "fwd+bwd speed-up"),
                ("fwd_bwd_memory_ratio", "fwd+bwd memory, ours / theirs"),
            ],
        )
    ]
    inference, compiled = sections["inference"], sections["inference_compiled"]
    timing = [("model_images_per_s", "images/s"), ("model_p50_ms", "p50 ms"), ("model_p90_ms", "p90 ms"), ("model_peak_mib", "peak MiB")]
    lines += ["", "## Whole model, inference (eager)", "", table(inference.get("rows", []), [*MODEL_COLUMNS, ("attention", "attention"), *timing])]
    lines += ["", f"## Whole model, inference, torch.compile (backend {compiled.get('backend', '-')})", ""]
    lines += [table(compiled.get("rows", []), [*MODEL_COLUMNS, *timing, ("first_call_s", "first call s (compiling)")])]
    encoder = [("encoder_p50_ms", "p50 ms"), ("encoder_p90_ms", "p90 ms"), ("encoder_peak_mib", "peak MiB")]
    lines += ["", "## Encoder alone (eager)", "", table(inference.get("rows", []), [*MODEL_COLUMNS, *encoder])]
    lines += ["", "## Against the baseline (same precision and batch)", ""]
    lines += [
        table(
            ratios["models"],
            [
                *MODEL_COLUMNS,
                ("baseline", "baseline"),
                ("images_per_s_ratio", "images/s ratio"),
                ("compiled_images_per_s_ratio", "compiled images/s ratio"),
                ("encoder_latency_ratio", "encoder latency ratio"),
            ],
        )
    ]
    step = [("step_p50_ms", "p50 ms"), ("step_p90_ms", "p90 ms"), ("step_images_per_s", "images/s"), ("step_peak_mib", "peak MiB")]
    lines += ["", "## One training step (bf16 autocast, AdamW)", "", table(sections["train_step"].get("rows", []), [*MODEL_COLUMNS, *step]), ""]
    lines += [
        table(
            ratios["train_step"],
            [("model", "model"), ("baseline", "baseline"), ("step_latency_ratio", "step latency ratio"), ("step_peak_memory_ratio", "peak memory ratio")],
        )
    ]
    notes = _not_run(sections)
    if notes:
        lines += ["", "## Sections not fully run", "", *notes]
    return "\n".join(lines) + "\n"
