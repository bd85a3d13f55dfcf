"""Which floating-point precision a training run uses, chosen by what the device does natively.

On CUDA, mixed precision is fp16 autocast with a gradient scaler by default, or bf16 autocast (no
scaler: bf16 has fp32's exponent range) on GPUs that compute bf16 (compute capability 8.0 or newer).
On the CPU it is bf16 autocast, which pays only where the processor has bf16 instructions (AVX-512
BF16 or AMX, used through oneDNN and ATen's AVX-512 kernels); elsewhere (AVX2, or ATen dispatching
below AVX-512) bf16 is emulated and a step is about 10-25x slower than in float32, so ``"auto"``
picks float32 there. fp16 on the CPU is refused (:class:`UnsupportedPrecision`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from litedetr.models.exported import InferencePrecision, check_inference_precision

__all__ = ["AMP_MODES", "AmpMode", "Precision", "UnsupportedPrecision", "cpu_bf16_native", "inference_autocast", "resolve_precision"]

logger = logging.getLogger(__name__)

AmpMode = Literal["auto", "on", "off", "bf16", "fp16"]
"""``on``: autocast in the device's default dtype (fp16 on CUDA, bf16 on the CPU); ``bf16``/``fp16``:
autocast in that dtype; ``off``: float32; ``auto``: the device's default only where it computes it natively."""
AMP_MODES: tuple[AmpMode, ...] = get_args(AmpMode)


class UnsupportedPrecision(ValueError):
    """The asked-for mixed precision does not exist on the device (fp16 on the CPU, bf16 on a GPU without it)."""


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and why (the ATen capability and the instruction sets).

    Native means ATen dispatches AVX-512 kernels (``torch.backends.cpu.get_cpu_capability()``, which
    ``ATEN_CPU_CAPABILITY`` can lower) and the processor has AVX-512 BF16 or AMX tiles.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    avx512_bf16 = torch.cpu._is_avx512_bf16_supported()
    amx = torch.cpu._is_amx_tile_supported()
    features = [name for name, present in (("AVX-512 BF16", avx512_bf16), ("AMX", amx)) if present]
    if not capability.startswith("AVX512"):
        return False, f"the CPU capability is {capability} (no AVX-512 kernels), so bf16 would be emulated"
    if not features:
        return False, f"the CPU capability is {capability} but the processor has neither AVX-512 BF16 nor AMX, so bf16 would be emulated"
    return True, f"the CPU capability is {capability} with {' and '.join(features)}: bf16 is native"


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a run.

    Attributes:
        autocast: run the forward pass under autocast in ``dtype``.
        dtype: the autocast dtype (``torch.bfloat16`` on the CPU, ``torch.float16`` on CUDA), or
            ``torch.float32`` without autocast.
        reason: one line saying what was chosen and why.
    """

    autocast: bool
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "float32") if self.autocast else "float32"

    def context(self, device: torch.device | str) -> contextlib.AbstractContextManager[object]:
        """What a forward pass on ``device`` runs in: autocast in ``dtype``, or nothing without autocast."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.dtype)


def resolve_precision(amp: AmpMode | bool, device: torch.device | str) -> Precision:
    """The precision of a run with ``amp`` (``True``/``False`` mean ``"on"``/``"off"``) on ``device``.

    ``"on"`` or ``"bf16"`` on a CPU without native bf16 keeps bf16 (the user asked for it) and logs a
    warning that it will be slower than float32. Raises :class:`UnsupportedPrecision` for ``"fp16"``
    on the CPU and ``"bf16"`` on a GPU without bf16.
    """
    mode = ("on" if amp else "off") if isinstance(amp, bool) else amp
    if mode not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(map(repr, AMP_MODES))}, got {amp!r}")
    device = torch.device(device)
    if mode == "off":
        return Precision(False, torch.float32, "float32 (mixed precision off)")
    if device.type == "cuda":
        return _cuda_precision(mode, device)
    if device.type != "cpu":
        if mode == "auto":
            return Precision(False, torch.float32, f"float32 (no mixed-precision recipe for {device.type})")
        raise ValueError(f"mixed precision is supported on cpu and cuda, not {device.type}")
    if mode == "fp16":
        raise UnsupportedPrecision("fp16 mixed precision is for CUDA; on the CPU, mixed precision is bf16 (--amp bf16, or --amp)")
    native, why = cpu_bf16_native()
    if native:
        return Precision(True, torch.bfloat16, f"bf16 autocast: {why}")
    if mode == "auto":
        return Precision(False, torch.float32, f"float32: {why}")
    logger.warning("bf16 autocast was asked for, but %s: it will run several times slower than in float32", why)
    return Precision(True, torch.bfloat16, f"bf16 autocast (asked for): {why}")


def inference_autocast(precision: InferencePrecision, device: torch.device | str) -> contextlib.AbstractContextManager[object]:
    """The context a PyTorch inference in ``precision`` runs in on ``device``: nothing for float32, bf16
    autocast for ``"bf16"`` (with :func:`resolve_precision`'s warning where the CPU would emulate it, and
    its :class:`UnsupportedPrecision` on a GPU without bf16)."""
    check_inference_precision(precision)
    if precision == "float32":
        return contextlib.nullcontext()
    return resolve_precision("bf16", device).context(device)


def _cuda_precision(mode: AmpMode, device: torch.device) -> Precision:
    """``on``/``auto``/``fp16``: fp16 with a gradient scaler; ``bf16``: bf16 without one, where the GPU computes bf16."""
    if mode != "bf16":
        return Precision(True, torch.float16, "fp16 autocast with a gradient scaler (CUDA)")
    with torch.cuda.device(device):
        supported = torch.cuda.is_bf16_supported(including_emulation=False)
        name = torch.cuda.get_device_name()
    if not supported:
        raise UnsupportedPrecision(f"--amp bf16 needs a GPU that computes bf16 (compute capability 8.0 or newer), {device} is a {name}; use --amp fp16")
    return Precision(True, torch.bfloat16, f"bf16 autocast without a gradient scaler (CUDA, {name})")
