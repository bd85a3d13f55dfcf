"""GFLOPs of a detector, per component, counted as the paper counts them (fvcore's conventions).

One multiply-add is one FLOP. The count runs the model once (batch 1, eval mode, no autograd) on
a ``(1, 3, H, W)`` image that enters the backbone at ``H x W`` as given (no resizing; pre- and
post-processing count nothing), and a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
counts every ATen op it sees:

- matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``): ``m * k * n`` per product;
  convolutions: ``batch * prod(weight shape) * prod(output spatial)`` (bias not counted);
- fused attention (``scaled_dot_product_attention`` kernels): ``q.k`` and ``weights.v`` products,
  plus its softmax;
- layer / group norm: 5 per element; batch norm 2 per element in eval, 5 in training (the
  ResNets' frozen batch norm is element-wise and counts 0, as in fvcore); nearest upsampling
  (the padding masks): 1 per output element;
- softmax: 1 per element (fvcore counts none; it is well below 0.1% of any model here);
- element-wise ops, indexing, top-k: 0.

Deformable attention is counted by formula from each :class:`MultiScaleDeformableAttention`
call's shapes, so that the count does not depend on the path the op takes (CPU gather without
autograd, ``grid_sample`` with it, Triton on CUDA): the module's linear layers are counted as
above; its core (everything it runs outside them) as

- bilinear sampling, fvcore's ``grid_sampler`` convention: 4 per sampled channel, i.e.
  ``4 * Lq * M * L * P * D`` (KDA's keys are its values, sampled once);
- the weighted sum of sampled values, ``Lq * M * L * P * D``; KDA's ``q.k`` dot products,
  ``Lq * M * L * P * D``; the softmax of the ``L * P`` weights per query and head.

Components are the :class:`~litedetr.models.Detector`'s top-level modules that run at inference
(``training_queries`` and ``criterion`` run only in training); an op belongs to the outermost module
running it (the box head, called inside the decoder for box refinement, is decoder there):

- ``backbone``; ``input_stage`` (projections to ``d_model``, the extra level, position embeddings);
- ``encoder``: the encoder layers only (the authors' ``transformer.encoder``);
- ``query_selection``: the encoder output head (``enc_output`` + norm, class and box heads over
  the tokens) that picks the decoder's top-k queries (and ``pos_trans`` in Deformable DETR / H-DETR);
- ``decoder``: the decoder layers, the query-position MLP (DINO) and the per-layer box refinement;
- ``heads``: class and box heads on every decoder layer's output.

Measured against fvcore on the authors' code, their ``encoder`` bucket is our ``encoder``, and their
``decoder`` bucket is our ``decoder + heads`` (DINO shares its heads with the decoder module, and
fvcore names a shared module by its first path, ``transformer.decoder``); input stage and query
selection are in neither, only in the total.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from litedetr.models.config import get_config
from litedetr.models.detector import Detector
from litedetr.nn import MultiScaleDeformableAttention
from litedetr.nn.encoder import LayerQueries
from litedetr.ops import LevelShapes, level_shapes

__all__ = ["AUTHORS_FVCORE", "COMPONENTS", "DEFAULT_SIZE", "FlopReport", "FlopCounter", "count_flops", "deformable_attention_flops"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten

COMPONENTS = ("backbone", "input_stage", "encoder", "query_selection", "decoder", "heads")
"""The components of a report, in the order the model runs them."""


DEFAULT_SIZE = (850, 1040)
"""The authors' FLOPs image size (H, W)."""

AUTHORS_FVCORE: dict[str, dict[str, float]] = {
    "deformable-detr-r50": {"total": 177.4, "encoder": 86.0},
    "dino-r50": {"total": 243.9, "backbone": 73.0, "encoder": 144.3, "decoder": 20.4},
    "lite-dino-r50-h3l1-2x3": {"total": 158.5, "backbone": 73.0, "encoder": 58.7, "decoder": 20.7},
    "lite-dino-r50-h3l1-6x1": {"total": 148.2, "backbone": 73.0, "encoder": 48.3, "decoder": 20.7},
    "lite-dino-r50-h2l2-2x3": {"total": 135.3, "backbone": 73.0, "encoder": 35.4, "decoder": 20.7},
}
"""GFLOPs of the original code by fvcore (one 3x850x1040 image, pure-PyTorch attention), by our preset name.

Buckets as in :meth:`FlopReport.authors_buckets`; an entry holds only the buckets that were measured
(Deformable DETR: the ``++ two-stage`` model of fundamentalvision/Deformable-DETR, total and encoder;
the rest: the Lite-DINO authors' code)."""


def _matmul_flops(a: Tensor, b: Tensor) -> int:
    """``(..., m, k) @ (..., k, n)`` -> ``batch * m * k * n``."""
    return prod(a.shape[:-1]) * a.shape[-1] * b.shape[-1]


def _conv_flops(x: Tensor, w: Tensor, out: Tensor, transposed: bool) -> int:
    spatial = (x if transposed else out).shape[2:]
    return x.shape[0] * prod(w.shape) * prod(spatial)


def _batch_norm_flops(x: Tensor, weight: Tensor | None, training: bool) -> int:
    """fvcore's: in training a norm (5 per element, 4 without affine); in eval a scale and shift (2, or 1)."""
    if training:
        return x.numel() * (5 if weight is not None else 4)
    return x.numel() * (2 if weight is not None else 1)


def _sdpa_flops(q: Tensor, k: Tensor, v: Tensor) -> int:
    """``(B, H, Lq, D)`` queries, ``(B, H, Lk, D)`` keys, ``(B, H, Lk, Dv)`` values: products + softmax."""
    batch_heads, lq, lk = prod(q.shape[:-2]), q.shape[-2], k.shape[-2]
    return batch_heads * lq * lk * (q.shape[-1] + v.shape[-1] + 1)


def _handlers() -> dict[Any, Callable[..., int]]:
    """ATen overload packet -> ``f(args, kwargs, out) -> FLOPs``."""

    def sdpa(args: tuple, kwargs: dict, out: Tensor) -> int:
        return _sdpa_flops(*args[:3])

    handlers: dict[Any, Callable[..., int]] = {
        aten.mm: lambda args, kwargs, out: _matmul_flops(args[0], args[1]),
        aten.bmm: lambda args, kwargs, out: _matmul_flops(args[0], args[1]),
        aten.addmm: lambda args, kwargs, out: _matmul_flops(args[1], args[2]),
        aten.baddbmm: lambda args, kwargs, out: _matmul_flops(args[1], args[2]),
        aten.convolution: lambda args, kwargs, out: _conv_flops(args[0], args[1], out, bool(args[6])),
        aten.native_layer_norm: lambda args, kwargs, out: args[0].numel() * (5 if args[2] is not None else 4),
        aten.native_group_norm: lambda args, kwargs, out: args[0].numel() * (5 if args[1] is not None else 4),
        aten._native_batch_norm_legit_no_training: lambda args, kwargs, out: _batch_norm_flops(args[0], args[1], False),
        aten._native_batch_norm_legit: lambda args, kwargs, out: _batch_norm_flops(args[0], args[1], len(args) > 5 and bool(args[5])),
        aten.native_batch_norm: lambda args, kwargs, out: _batch_norm_flops(args[0], args[1], bool(args[5])),
        aten.upsample_nearest2d: lambda args, kwargs, out: out.numel(),
        aten._softmax: lambda args, kwargs, out: args[0].numel(),
        aten._scaled_dot_product_flash_attention_for_cpu: sdpa,
        aten._scaled_dot_product_flash_attention: sdpa,
        aten._scaled_dot_product_efficient_attention: sdpa,
        aten._scaled_dot_product_cudnn_attention: sdpa,
    }
    return handlers


_HANDLERS = _handlers()

_SHAPE_ONLY = (aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.convolution)
"""Ops whose arithmetic :class:`FlopCounter` can skip (``execute=False``): their outputs become zeros of the right shape."""


def deformable_attention_flops(module: MultiScaleDeformableAttention, num_queries: int) -> int:
    """FLOPs of one deformable-attention core (sampling, weights, weighted sum) for ``num_queries`` queries.

    Per query, head, level and point: a bilinear sample of ``D`` channels (4 per channel) and its
    share of the weighted sum (``D``); KDA adds the ``q.k`` product (``D``), a bilinear sample of the
    key (``4 D``) when keys have a projection of their own, and the query-only logit (1) with
    ``query_logits``; either way a softmax over the ``L * P`` weights (1 per weight). The linear
    layers are not included.
    """
    d_head = module.d_model // module.n_heads
    samples = num_queries * module.n_heads * module.n_levels * module.n_points
    kda = module.kda
    key_aware = d_head + (4 * d_head if kda.key_proj else 0) + (1 if kda.query_logits else 0) if module.key_aware else 0
    per_sample = 4 * d_head + d_head + key_aware + 1
    return samples * per_sample


@dataclass
class FlopReport:
    """GFLOPs of one model at one image size.

    Attributes:
        model: preset name (or ``"custom"``).
        size: image ``(H, W)``.
        components: GFLOPs per entry of :data:`COMPONENTS`.
        other: GFLOPs of ops that ran outside every component module (0 for our detectors).
        spatial_shapes: ``(H_l, W_l)`` of every level, finest first.
        schedule: the encoder's :class:`~litedetr.nn.encoder.LayerQueries` per layer.
    """

    model: str
    size: tuple[int, int]
    components: dict[str, float]
    other: float
    spatial_shapes: list[tuple[int, int]]
    schedule: list[LayerQueries] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.components.values()) + self.other

    def authors_buckets(self) -> dict[str, float]:
        """GFLOPs in the buckets of the authors' fvcore count: ``total``, ``backbone``, ``encoder``, ``decoder`` (ours + heads)."""
        c = self.components
        return {"total": self.total, "backbone": c["backbone"], "encoder": c["encoder"], "decoder": c["decoder"] + c["heads"]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "size": list(self.size),
            **self.components,
            "other": self.other,
            "total": self.total,
            "tokens_per_level": [h * w for h, w in self.spatial_shapes],
            "spatial_shapes": [list(s) for s in self.spatial_shapes],
            "queries_per_encoder_layer": [s.num_queries for s in self.schedule],
            "narrow_ffn_tokens_per_encoder_layer": [s.narrow_ffn_tokens for s in self.schedule],
        }


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs of every ATen op run in the context, per component of ``model``.

    Args:
        model: the detector (or any module: ops outside the detector's components count as ``"other"``);
            hooks on its modules track which component is running.
        execute: ``False`` skips the arithmetic of matrix products and convolutions (their outputs
            are zeros of the right shape and dtype), which makes counting an R50 model at 850x1040 take
            a few seconds on one core; every op still runs in order, with its real shapes.
    """

    def __init__(self, model: nn.Module, execute: bool = True):
        super().__init__()
        self.model = model
        self.execute = execute
        self.flops: Counter[str] = Counter()
        self._stack: list[tuple[str, nn.Module]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> FlopCounter:
        for name, module in self.model.named_modules():
            if not name:
                continue
            self._handles.append(module.register_forward_pre_hook(self._enter_module(name)))
            self._handles.append(module.register_forward_hook(self._exit_module, with_kwargs=True, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()
        super().__exit__(*exc)

    def _enter_module(self, name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._stack.append((name, module))

        return hook

    def _exit_module(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._stack.pop()
        if isinstance(module, MultiScaleDeformableAttention):
            query = args[0] if args else kwargs["query"]
            self.flops[self._component()] += deformable_attention_flops(module, query.shape[0] * query.shape[1])

    def _component(self) -> str:
        if not self._stack:
            return "other"
        top = self._stack[0][0].split(".")[0]
        return top if top in COMPONENTS else "other"

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if not self.execute and packet in _SHAPE_ONLY:
            meta_out = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
            out = tree_map(lambda t: torch.zeros(t.shape, dtype=t.dtype, device=args[0].device) if isinstance(t, Tensor) else t, meta_out)
        else:
            out = func(*args, **kwargs)
        inside_attention_core = bool(self._stack) and isinstance(self._stack[-1][1], MultiScaleDeformableAttention)
        if packet in _HANDLERS and not inside_attention_core:
            self.flops[self._component()] += _HANDLERS[packet](args, kwargs, out[0] if isinstance(out, (tuple, list)) else out)
        return out


def _to_meta(x: Any) -> Any:
    return x.to("meta") if isinstance(x, Tensor) else x


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def count_flops(model: Detector | str, size: tuple[int, int] = DEFAULT_SIZE, execute: bool = False) -> FlopReport:
    """GFLOPs of ``model`` (a :class:`Detector` or a preset name) on one ``size = (H, W)`` image.

    Args:
        model: the detector, or a preset name (built with random weights on the CPU).
        size: image height and width, fed to the backbone as they are.
        execute: run the matrix products and convolutions for real (slow at large sizes; the count
            is the same, see :class:`FlopCounter`).
    """
    name = model if isinstance(model, str) else "custom"
    if isinstance(model, str):
        model = Detector(get_config(model))
    h, w = size
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    device = next(model.parameters()).device
    image = torch.zeros(1, 3, h, w, device=device)
    mask = torch.zeros(1, h, w, dtype=torch.bool, device=device)
    with _eval_no_grad(model):
        tokens_shapes: list[LevelShapes] = []
        hook = model.encoder.register_forward_pre_hook(lambda module, args: tokens_shapes.append(args[2]))
        try:
            with FlopCounter(model, execute) as counter:
                model.forward_features(model.backbone(image), mask)
        finally:
            hook.remove()
    spatial_shapes = level_shapes(tokens_shapes[0])
    components = {c: counter.flops[c] / 1e9 for c in COMPONENTS}
    report = FlopReport(name, (h, w), components, counter.flops["other"] / 1e9, list(spatial_shapes), model.encoder.schedule(spatial_shapes))
    logger.debug("%s at %dx%d: %.1f GFLOPs", name, h, w, report.total)
    return report
