"""Fused C++ CPU kernels for MSDA and KDA: forward passes and their fused backward passes.

The PyTorch implementation in :mod:`litedetr.ops.deform_attn` samples through index tensors it
builds first (``grid_sample`` with autograd) and, for KDA, materialises every sampled key. The
kernels in ``csrc/deform_attn_cpu.cpp`` work per (image, query, head): bilinear corners are computed
in place, the sampled keys of one query-head stay in a small buffer, and the softmax and weighted sum
follow at once. The backward recomputes the corners and KDA's softmax from the inputs and scatters
into the key and value gradients, each thread owning whole image-head slices of them. Same
conventions and results as the PyTorch code (to float rounding), parallel over torch's intra-op
threads. The functions here run the forward without autograd (inference); with autograd
:mod:`litedetr.ops.cpu_autograd` runs forward and backward as ``torch.library`` custom ops.

They are compiled with torch's JIT extension loader on first use (a C++ compiler and ``ninja`` are
needed; about a minute, once) and cached under ``TORCH_EXTENSIONS_DIR`` (by default
``~/.cache/torch_extensions``), one build per CPU instruction set (``torch.backends.cpu``'s
capability) and per digest of the source, flags, torch's version and location, and the Python version
(:func:`build_name`), so that two virtual environments on one machine keep their own builds.
Where they cannot be built, :mod:`litedetr.ops` logs one warning and keeps its PyTorch implementation.
Set ``LITEDETR_CPU_KERNELS=0`` to never build or use them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from litedetr.ops.geometry import SpatialShapes, check_token_count, level_shapes
from litedetr.ops.switch import KernelSwitch

__all__ = [
    "ENV_SWITCH",
    "build_name",
    "check_key_aware_shapes",
    "check_shapes",
    "compute_dtype",
    "cpu_kernels_disabled",
    "enabled",
    "extensions_root",
    "load",
    "ms_deform_attn",
    "ms_deform_attn_key_aware",
    "prepare",
]

logger = logging.getLogger(__name__)

ENV_SWITCH = "LITEDETR_CPU_KERNELS"
"""Environment variable; ``0`` turns the C++ kernels off (never built, never used)."""
SOURCE = Path(__file__).parent / "csrc" / "deform_attn_cpu.cpp"
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # the last two computed in float32
_switch = KernelSwitch()


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels (built on the first call of a process that finds no cached build), or
    None, with one logged warning naming the cause, where they cannot be built."""
    capability = torch.backends.cpu.get_cpu_capability()
    cflags = ["-O3", "-fopenmp", *_ISA_FLAGS.get(capability, [])]  # OpenMP: at::parallel_for runs serially without it
    name = build_name(capability, cflags)
    try:
        load_extension = _import_loader()
        _put_ninja_on_path()
        build_directory = extensions_root() / name
        build_directory.mkdir(parents=True, exist_ok=True)
        if not (build_directory / f"{name}.so").exists():
            logger.info("building the C++ CPU kernels (%s; once, about a minute) in %s", capability, build_directory)
        return load_extension(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_directory),
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 - any failure (no compiler or ninja, a failed build or load) means: fall back
        logger.warning("C++ CPU kernels unavailable, using the PyTorch implementation (set %s=0 to skip the build): %s", ENV_SWITCH, error)
        return None


def build_name(capability: str, cflags: list[str]) -> str:
    """The extension's name, which keys its build: the capability and a digest of everything the
    binary depends on (the source, the flags, torch's version and the directory it is installed in, whose
    headers the build includes, and the Python version), so that two environments or checkouts on one
    machine keep their own builds instead of rebuilding each other's (a build whose include paths
    changed is rebuilt by the loader)."""
    digest = hashlib.sha256()
    torch_dir = str(Path(torch.__file__).resolve().parent)
    for part in (SOURCE.read_bytes(), " ".join(cflags).encode(), torch.__version__.encode(), torch_dir.encode(), sys.version.encode()):
        digest.update(part)
    return f"litedetr_deform_attn_cpu_{capability.lower()}_{digest.hexdigest()[:16]}"


def extensions_root() -> Path:
    """Where builds go: ``TORCH_EXTENSIONS_DIR`` as torch's loader reads it, else ``~/.cache/torch_extensions``
    (or under ``XDG_CACHE_HOME``)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "torch_extensions"


def _import_loader() -> Callable[..., ModuleType]:
    """``torch.utils.cpp_extension.load``, imported without its CUDA_HOME warning (irrelevant to a CPU build)."""
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load as load_extension
    finally:
        torch_logger.setLevel(level)
    return load_extension


def _put_ninja_on_path() -> None:
    """torch's loader runs ``ninja`` from PATH; the ``ninja`` wheel's binary is not on it outside an activated environment."""
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def compute_dtype(value: Tensor) -> torch.dtype:
    """The dtype the kernels run in for ``value``: float64 for float64, float32 for everything else
    (bfloat16 and float16 from autocast are upcast, and the results cast back)."""
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def enabled(*tensors: Tensor) -> bool:
    """Whether :mod:`litedetr.ops` runs these CPU tensors through the C++ kernels (without autograd the
    forward functions below, with autograd the forward and fused backward of
    :mod:`litedetr.ops.cpu_autograd`): float32, float64, bfloat16 or float16 (the last two computed in
    float32), not switched off (``LITEDETR_CPU_KERNELS=0``, :func:`cpu_kernels_disabled`), not inside
    ``torch.compile`` (which compiles the PyTorch implementation instead), and built."""
    if _switched_off() or torch.compiler.is_compiling():
        return False
    if not all(t.device.type == "cpu" and t.dtype in _DTYPES for t in tensors):
        return False
    return load() is not None


def prepare() -> bool:
    """Build (or load) the kernels now unless they are switched off (``LITEDETR_CPU_KERNELS=0``), so that a
    first build is not charged to whatever runs first (the trainer calls it before its clock starts);
    returns whether they are available."""
    if _switched_off():
        return False
    return load() is not None


def _switched_off() -> bool:
    return not _switch.on or os.environ.get(ENV_SWITCH, "1") == "0"


def cpu_kernels_disabled() -> contextlib.AbstractContextManager[None]:
    """Within this context, :mod:`litedetr.ops` runs its PyTorch implementation on CPU (reference runs, benchmarks)."""
    return _switch.off()


def _kernels() -> ModuleType:
    module = load()
    if module is None:
        raise RuntimeError("the C++ CPU kernels could not be built (see the logged warning)")
    return module


def check_shapes(value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, **per_query: tuple[Tensor, tuple[str, ...]]) -> Tensor:
    """Every shape the kernels index by, checked before they run (the C++ checks them again); returns
    the level shapes as the ``(L, 2)`` long CPU tensor the kernels read.

    ``per_query`` names further tensors and their dimensions by letter (``B, Lq, M, L, P, D``),
    e.g. ``attention_weights=(weights, ("B", "Lq", "M", "L", "P"))``.

    Raises:
        ValueError: a shape does not fit the others (named).
    """
    if value.dim() != 4 or sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        shapes = f"{tuple(value.shape)} and {tuple(sampling_locations.shape)}"
        raise ValueError(f"value must be (B, S, M, D) and sampling_locations (B, Lq, M, L, P, 2), got {shapes}")
    b, s, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    if sampling_locations.shape[0] != b or sampling_locations.shape[2] != m:
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} do not match value {tuple(value.shape)} in B or M")
    shapes = level_shapes(spatial_shapes)
    if len(shapes) != levels:
        raise ValueError(f"spatial_shapes must be ({levels}, 2) covering the {s} tokens of value, got {shapes}")
    check_token_count(shapes, s)
    sizes = {"B": b, "Lq": lq, "M": m, "L": levels, "P": points, "D": d}
    for name, (tensor, dims) in per_query.items():
        expected = tuple(sizes[k] for k in dims)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} must be ({', '.join(dims)}) = {expected}, got {tuple(tensor.shape)}")
    return torch.tensor(shapes, dtype=torch.long)


def check_key_aware_shapes(
    query: Tensor, key: Tensor, value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, logit_bias: Tensor | None
) -> Tensor:
    """:func:`check_shapes` for KDA: the query, the optional logit bias and the key against the value.

    Raises:
        ValueError: a shape does not fit the others (named).
    """
    per_query = {"query": (query, ("B", "Lq", "M", "D"))}
    if logit_bias is not None:
        per_query["logit_bias"] = (logit_bias, ("B", "Lq", "M", "L", "P"))
    shapes = check_shapes(value, spatial_shapes, sampling_locations, **per_query)
    if key.shape != value.shape:
        raise ValueError(f"key must have the shape of value {tuple(value.shape)}, got {tuple(key.shape)}")
    return shapes


def ms_deform_attn(value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """MSDA forward: ``(B, S, M, D)`` values, ``(H_l, W_l)`` per level (a tuple or an ``(L, 2)`` tensor), ``(B, Lq, M, L, P, 2)`` locations,
    ``(B, Lq, M, L, P)`` weights -> ``(B, Lq, M*D)`` in value's dtype (computed in :func:`compute_dtype`). No autograd.

    Raises:
        ValueError: a shape does not fit the others (named).
    """
    shapes = check_shapes(value, spatial_shapes, sampling_locations, attention_weights=(attention_weights, ("B", "Lq", "M", "L", "P")))
    dtype = compute_dtype(value)
    out = _kernels().ms_deform_attn_forward(value.to(dtype), shapes, sampling_locations.to(dtype), attention_weights.to(dtype))
    return out.to(value.dtype)


def ms_deform_attn_key_aware(
    query: Tensor, key: Tensor, value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, logit_bias: Tensor | None = None
) -> Tensor:
    """KDA forward: ``(B, Lq, M, D)`` queries, ``(B, S, M, D)`` keys and values (sampled once when
    ``key is value``), ``(H_l, W_l)`` per level, ``(B, Lq, M, L, P, 2)`` locations and an optional
    ``(B, Lq, M, L, P)`` logit bias -> ``(B, Lq, M*D)`` in value's dtype (computed in :func:`compute_dtype`). No autograd.

    Raises:
        ValueError: a shape does not fit the others (named).
    """
    shapes = check_key_aware_shapes(query, key, value, spatial_shapes, sampling_locations, logit_bias)
    dtype = compute_dtype(value)
    shared = key is value
    values = value.to(dtype)
    keys = values if shared else key.to(dtype)
    bias = None if logit_bias is None else logit_bias.to(dtype)
    out = _kernels().ms_deform_attn_key_aware_forward(query.to(dtype), keys, values, shapes, sampling_locations.to(dtype), shared, bias)
    return out.to(value.dtype)
