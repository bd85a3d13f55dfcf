"""The C++ CPU kernels: agreement with the PyTorch paths at D=32 (the compiled-in fast path), float64
accuracy of the float32 kernel, thread invariance, strided inputs, dispatch and the build fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from litedetr.ops import attention_backend, cpu_kernels, ms_deform_attn, ms_deform_attn_key_aware

SHAPES = torch.tensor([[20, 24], [10, 12], [5, 6], [3, 3]])

pytestmark = pytest.mark.skipif(not cpu_kernels.enabled(torch.zeros(1)), reason="the C++ CPU kernels are not available here")


def inputs(dtype: torch.dtype, d: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Encoder-like inputs: 2 images, every token a query, 8 heads, 4 points, some samples off the map."""
    s = int(SHAPES.prod(1).sum())
    g = torch.Generator().manual_seed(seed)
    kw = dict(dtype=dtype, generator=g)
    return {
        "query": torch.randn(2, s, 8, d, **kw),
        "key": torch.randn(2, s, 8, d, **kw),
        "value": torch.randn(2, s, 8, d, **kw),
        "locations": torch.rand(2, s, 8, len(SHAPES), 4, 2, **kw) * 1.2 - 0.1,
        "weights": torch.rand(2, s, 8, len(SHAPES), 4, **kw).softmax(-1),
        "bias": 2 * torch.randn(2, s, 8, len(SHAPES), 4, **kw),
    }


def run_all(x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """MSDA, KDA with separate keys and KDA with shared keys/values (each also with a logit bias), on whatever path is active."""
    return [
        ms_deform_attn(x["value"], SHAPES, x["locations"], x["weights"]),
        ms_deform_attn_key_aware(x["query"], x["key"], x["value"], SHAPES, x["locations"]),
        ms_deform_attn_key_aware(x["query"], x["value"], x["value"], SHAPES, x["locations"]),
        ms_deform_attn_key_aware(x["query"], x["key"], x["value"], SHAPES, x["locations"], x["bias"]),
        ms_deform_attn_key_aware(x["query"], x["value"], x["value"], SHAPES, x["locations"], x["bias"]),
    ]


@pytest.mark.parametrize("d", [32, 12])
def test_kernels_match_the_pytorch_path_in_float64(d):
    x = inputs(torch.float64, d)
    with cpu_kernels.cpu_kernels_disabled():
        expected = run_all(x)
    for out, ref in zip(run_all(x), expected):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_float32_kernels_are_as_accurate_as_the_pytorch_path():
    """Against float64 results, the float32 kernels' error is float32 rounding, no larger than the PyTorch path's."""
    x64 = inputs(torch.float64)
    truth = run_all(x64)
    x32 = {k: v.float() for k, v in x64.items()}
    kernel = run_all(x32)
    with cpu_kernels.cpu_kernels_disabled():
        pytorch = run_all(x32)
    for out, ref, exact in zip(kernel, pytorch, truth):
        kernel_error = (out.double() - exact).abs().max().item()
        pytorch_error = (ref.double() - exact).abs().max().item()
        assert kernel_error < 1e-5
        assert kernel_error <= 2 * pytorch_error + 1e-7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    """bf16/fp16 inputs (autocast's, in inference) run the float32 kernels on the upcast inputs and come
    back in their dtype: one rounding of the float32 result, more accurate than the PyTorch path in that dtype."""
    low = {k: v.to(dtype) for k, v in inputs(torch.float32).items()}
    up = {k: v.float() for k, v in low.items()}
    truth = run_all({k: v.double() for k, v in up.items()})
    with torch.no_grad():
        outs, in_float32 = run_all(low), run_all(up)
        with cpu_kernels.cpu_kernels_disabled():
            pytorch = run_all(low)
    for out, ref, exact, theirs in zip(outs, in_float32, truth, pytorch):
        assert out.dtype == dtype and torch.equal(out, ref.to(dtype))
        assert (out.double() - exact).abs().max() <= (theirs.double() - exact).abs().max()


def test_results_do_not_depend_on_the_thread_count():
    x = inputs(torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_all(x)
        torch.set_num_threads(max(2, threads))
        multi = run_all(x)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


def test_strided_inputs():
    """Views that are not contiguous (a channels-last value, a sliced query) give the contiguous results."""
    x = inputs(torch.float64)
    strided = dict(x)
    strided["value"] = x["value"].permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    strided["query"] = torch.cat([x["query"], x["query"]], dim=-1)[..., :32]
    assert not strided["value"].is_contiguous() and not strided["query"].is_contiguous()
    for a, b in zip(run_all(strided), run_all(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dispatch():
    x = inputs(torch.float32)
    assert cpu_kernels.enabled(x["value"]) and attention_backend(x["value"]) == "cpu_kernel"
    with cpu_kernels.cpu_kernels_disabled():
        assert not cpu_kernels.enabled(x["value"]) and attention_backend(x["value"]) == "gather"
    assert attention_backend(x["value"].bfloat16()) == "cpu_kernel", "low precision is computed in float32"
    value = x["value"].requires_grad_()
    assert attention_backend(value) == "cpu_kernel", "with autograd: the fused forward and backward (tests/ops/test_cpu_backward.py)"
    with cpu_kernels.cpu_kernels_disabled():
        assert attention_backend(value) == "grid_sample"
    assert ms_deform_attn(value, SHAPES, x["locations"], x["weights"]).grad_fn is not None
    with torch.no_grad():
        assert attention_backend(value) == "cpu_kernel"


def test_environment_switch(monkeypatch):
    x = inputs(torch.float32)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not cpu_kernels.enabled(x["value"])
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1")
    assert cpu_kernels.enabled(x["value"])


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def broken(**_):
        raise RuntimeError("Error building extension 'litedetr_deform_attn_cpu'")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    with caplog.at_level(logging.WARNING, logger="litedetr.ops.cpu_kernels"):
        assert cpu_kernels.load.__wrapped__() is None
    assert "C++ CPU kernels unavailable" in caplog.text and "Error building extension" in caplog.text


def test_build_is_keyed_by_source_flags_torch_its_location_and_python(monkeypatch, tmp_path):
    base = cpu_kernels.build_name("AVX2", ["-O3"])
    assert base.startswith("litedetr_deform_attn_cpu_avx2_") and base == cpu_kernels.build_name("AVX2", ["-O3"])
    assert cpu_kernels.build_name("AVX512", ["-O3"]).startswith("litedetr_deform_attn_cpu_avx512_")
    assert cpu_kernels.build_name("AVX2", ["-O3", "-mavx2"]) != base
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert cpu_kernels.build_name("AVX2", ["-O3"]) != base
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))  # the same torch in another environment
    assert cpu_kernels.build_name("AVX2", ["-O3"]) != base
    monkeypatch.undo()
    source = tmp_path / "deform_attn_cpu.cpp"
    source.write_text(cpu_kernels.SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", source)
    assert cpu_kernels.build_name("AVX2", ["-O3"]) != base


def test_a_missing_build_is_announced_and_goes_into_its_own_folder(monkeypatch, tmp_path, caplog):
    import torch.utils.cpp_extension

    calls = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: calls.append(kwargs) or "module")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="litedetr.ops.cpu_kernels"):
        assert cpu_kernels.load.__wrapped__() == "module"
    folder = Path(calls[0]["build_directory"])
    assert folder.parent == tmp_path and folder.name == calls[0]["name"] and folder.is_dir()
    assert "building the C++ CPU kernels" in caplog.text and "once, about a minute" in caplog.text

    (folder / f"{calls[0]['name']}.so").write_bytes(b"")  # a cached build: loaded without the announcement
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="litedetr.ops.cpu_kernels"):
        cpu_kernels.load.__wrapped__()
    assert "building" not in caplog.text


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda x: x.update(weights=x["weights"][:, :, :, :, :1]), r"attention_weights must be \(B, Lq, M, L, P\)"),
        (lambda x: x.update(weights=x["weights"][:1]), r"attention_weights must be"),
        (lambda x: x.update(locations=x["locations"][:, :, :4]), "do not match value"),
        (lambda x: x.update(query=x["query"][:, :5]), r"query must be \(B, Lq, M, D\)"),
        (lambda x: x.update(key=x["key"][:, :5]), "key must have the shape of value"),
        (lambda x: x.update(bias=x["bias"][..., :1]), r"logit_bias must be \(B, Lq, M, L, P\)"),
    ],
)
def test_inconsistent_shapes_are_refused_before_and_inside_the_kernels(change, message):
    """One attention weight where the kernel reads 4 would be a heap over-read: both layers refuse it."""
    x = inputs(torch.float32)
    change(x)
    kernels = cpu_kernels._kernels()
    with pytest.raises(ValueError, match=message):
        cpu_kernels.ms_deform_attn(x["value"], SHAPES, x["locations"], x["weights"])
        cpu_kernels.ms_deform_attn_key_aware(x["query"], x["key"], x["value"], SHAPES, x["locations"], x["bias"])
    with pytest.raises(RuntimeError, match="must"):  # TORCH_CHECK in C++, for callers that bypass the Python entry
        kernels.ms_deform_attn_forward(x["value"], SHAPES, x["locations"], x["weights"])
        kernels.ms_deform_attn_key_aware_forward(x["query"], x["key"], x["value"], SHAPES, x["locations"], False, x["bias"])


def test_spatial_shapes_that_do_not_fit_are_refused():
    x = inputs(torch.float32)
    with pytest.raises(ValueError, match="spatial_shapes must be"):
        cpu_kernels.ms_deform_attn(x["value"], SHAPES[:2], x["locations"], x["weights"])
    with pytest.raises(RuntimeError, match="spatial_shapes must be"):
        cpu_kernels._kernels().ms_deform_attn_forward(x["value"], SHAPES[:2], x["locations"], x["weights"])


def test_python_int_shapes_are_the_same_input():
    x = inputs(torch.float32)
    as_tuple = tuple(tuple(s) for s in SHAPES.tolist())
    torch.testing.assert_close(
        cpu_kernels.ms_deform_attn(x["value"], as_tuple, x["locations"], x["weights"]),
        cpu_kernels.ms_deform_attn(x["value"], SHAPES, x["locations"], x["weights"]),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match="spatial_shapes must be"):
        cpu_kernels.ms_deform_attn_key_aware(x["query"], x["key"], x["value"], as_tuple[:3], x["locations"])


def test_torch_compile_traces_the_pytorch_path_without_graph_breaks():
    """Under ``torch.compile`` the ops take the PyTorch gather path (the compiler sees and fuses its
    tensor ops; the C++ kernels would be opaque to it), in one graph, with the kernels' results."""
    from torch._dynamo.utils import counters

    x = inputs(torch.float32)
    shapes = tuple(tuple(s) for s in SHAPES.tolist())
    targets: list[str] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    def run(value: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return ms_deform_attn(value, shapes, locations, weights)

    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        compiled = torch.compile(run, backend=recording_backend)(x["value"], x["locations"], x["weights"])
        eager = run(x["value"], x["locations"], x["weights"])
    assert not counters["graph_break"], list(counters["graph_break"])
    assert any("embedding_bag" in target for target in targets)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_prepare_builds_unless_switched_off(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernels, "load", lambda: calls.append(1) or object())
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert cpu_kernels.prepare() is False and calls == []
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
    with cpu_kernels.cpu_kernels_disabled():
        assert cpu_kernels.prepare() is False and calls == []
    assert cpu_kernels.prepare() is True and calls == [1]
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)  # no compiler: the PyTorch implementation
    assert cpu_kernels.prepare() is False
