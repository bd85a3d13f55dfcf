"""The precision a run trains in: bf16 autocast on a CPU only where bf16 is native, float32 elsewhere,
a warning when bf16 is forced on a CPU that emulates it; fp16 with a scaler on CUDA, or bf16 without
one where the GPU computes it; fp16 on the CPU refused; ``--amp [bf16|fp16]``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging

import pytest
import torch

from litedetr.engine import precision
from litedetr.engine.precision import (
    UnsupportedPrecision,
    cpu_bf16_native,
    resolve_precision,
)


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given ATen capability and bf16 instruction sets."""

    def pretend(capability: str, avx512_bf16: bool = False, amx: bool = False) -> None:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    return pretend


@pytest.mark.parametrize(
    ("capability", "avx512_bf16", "amx", "native"),
    [
        ("AVX2", False, False, False),
        ("AVX2", True, False, False),  # ATen limited to AVX2 (ATEN_CPU_CAPABILITY=avx2) on a bf16 CPU
        ("AVX512", False, False, False),  # AVX-512 without BF16 (e.g. Skylake-X): emulated
        ("AVX512", True, False, True),
        ("AVX512", False, True, True),
        ("DEFAULT", False, False, False),
    ],
)
def test_native_bf16_needs_avx512_kernels_and_bf16_instructions(cpu, capability, avx512_bf16, amx, native):
    cpu(capability, avx512_bf16, amx)
    got, why = cpu_bf16_native()
    assert got is native
    assert capability in why


def test_auto_picks_bf16_only_where_native(cpu):
    cpu("AVX512", avx512_bf16=True)
    chosen = resolve_precision("auto", "cpu")
    assert (chosen.autocast, chosen.dtype, chosen.name) == (True, torch.bfloat16, "bf16")
    assert "native" in chosen.reason
    cpu("AVX2")
    chosen = resolve_precision("auto", "cpu")
    assert (chosen.autocast, chosen.dtype, chosen.name) == (False, torch.float32, "float32")
    assert chosen.reason.startswith("float32") and "emulated" in chosen.reason


def test_forced_bf16_on_an_emulating_cpu_warns(cpu, caplog):
    cpu("AVX2")
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        chosen = resolve_precision(True, "cpu")
    assert chosen.autocast and chosen.dtype == torch.bfloat16
    assert "slower than in float32" in caplog.text and "AVX2" in caplog.text
    cpu("AVX512", amx=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        assert resolve_precision(True, "cpu").autocast
    assert caplog.text == ""


def test_off_cuda_and_bad_values(cpu):
    cpu("AVX512", avx512_bf16=True)
    assert resolve_precision(False, "cpu") == resolve_precision("off", "cpu")
    assert not resolve_precision("off", "cpu").autocast
    cuda = resolve_precision("on", "cuda")
    assert cuda.autocast and cuda.dtype == torch.float16
    with pytest.raises(ValueError, match="amp must be"):
        resolve_precision("fast", "cpu")


def test_the_trainer_and_the_demo_follow_the_choice(cpu, tiny_synthetic, tmp_path):
    from litedetr.engine import Trainer
    from litedetr.tools.demo import DemoRecipe, demo_train_config

    config = demo_train_config(DemoRecipe(), tiny_synthetic, "cpu")
    assert config.amp == "auto"
    cpu("AVX2")
    trainer = Trainer(config, tmp_path / "avx2")
    assert trainer.precision.dtype == torch.float32 and "AVX2" in trainer.precision.reason
    with trainer.precision.context(trainer.device):
        assert not torch.is_autocast_enabled("cpu")
    cpu("AVX512", avx512_bf16=True)
    trainer = Trainer(config, tmp_path / "avx512")
    assert trainer.precision.dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    with trainer.precision.context(trainer.device):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


@pytest.fixture
def cuda(monkeypatch):
    """Pretend to be a GPU named ``name`` that does or does not compute bf16 (no CUDA is touched)."""

    def pretend(bf16: bool, name: str = "Pretend GPU") -> None:
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 and not including_emulation)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return pretend


def test_explicit_dtypes_on_cuda(cuda):
    for amp in (True, "on", "auto", "fp16"):
        chosen = resolve_precision(amp, "cuda:1")
        assert (chosen.autocast, chosen.dtype, chosen.name) == (True, torch.float16, "fp16") and "scaler" in chosen.reason
    cuda(bf16=True, name="NVIDIA H200")
    chosen = resolve_precision("bf16", "cuda:1")
    assert (chosen.autocast, chosen.dtype, chosen.name) == (True, torch.bfloat16, "bf16")
    assert "without a gradient scaler" in chosen.reason and "H200" in chosen.reason
    cuda(bf16=False, name="Tesla V100")
    with pytest.raises(UnsupportedPrecision, match=r"--amp bf16 needs a GPU that computes bf16 .*cuda:1 is a Tesla V100; use --amp fp16"):
        resolve_precision("bf16", "cuda:1")


def test_explicit_dtypes_on_the_cpu(cpu, caplog):
    cpu("AVX512", avx512_bf16=True)
    assert resolve_precision("bf16", "cpu") == resolve_precision(True, "cpu")
    assert resolve_precision("bf16", "cpu").dtype == torch.bfloat16
    with pytest.raises(UnsupportedPrecision, match=r"fp16 mixed precision is for CUDA; on the CPU, mixed precision is bf16"):
        resolve_precision("fp16", "cpu")
    cpu("AVX2")
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        assert resolve_precision("bf16", "cpu").dtype == torch.bfloat16
    assert "slower than in float32" in caplog.text


def test_amp_argument():
    from litedetr.tools.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    required = ["--model", "lite-dino-r18-tiny-h3l1-2x3", "--out", "run"]
    assert parser.parse_args(required).amp is False
    assert parser.parse_args([*required, "--amp"]).amp is True  # today's meaning, as stored in existing checkpoints
    assert parser.parse_args(["--amp", *required]).amp is True
    assert parser.parse_args([*required, "--amp", "bf16"]).amp == "bf16"
    assert parser.parse_args([*required, "--amp", "fp16"]).amp == "fp16"
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--amp", "fp32"])


def test_the_trainer_takes_the_dtype_and_resume_refuses_another(cpu, tiny_synthetic, tmp_path):
    from litedetr.engine import Trainer
    from litedetr.tools.demo import DemoRecipe, demo_train_config

    cpu("AVX512", avx512_bf16=True)
    config = dataclasses.replace(demo_train_config(DemoRecipe(), tiny_synthetic, "cpu"), amp=True)
    with pytest.raises(UnsupportedPrecision, match="fp16"):
        Trainer(dataclasses.replace(config, amp="fp16"), tmp_path / "fp16")
    trainer = Trainer(config, tmp_path / "run")
    assert trainer.precision.dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    trainer.out.mkdir(parents=True)
    trainer.save()
    with pytest.raises(ValueError, match=r"trained with other settings \(amp\)"):
        Trainer(dataclasses.replace(config, amp="bf16"), tmp_path / "run", resume=True)
    assert Trainer(config, tmp_path / "run", resume=True).precision.dtype == torch.bfloat16


def test_inference_autocast_is_bf16_autocast_or_nothing(cpu, caplog):
    from litedetr.engine.precision import inference_autocast

    with inference_autocast("float32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    cpu("AVX512", avx512_bf16=True)
    with caplog.at_level(logging.WARNING), inference_autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not caplog.records
    cpu("AVX2")
    with caplog.at_level(logging.WARNING), inference_autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
    assert "several times slower" in caplog.text
    with pytest.raises(ValueError, match="precision must be one of float32, bf16"):
        inference_autocast("fp16", "cpu")
