"""``litedetr train``: train a preset on a COCO-format dataset (the built-in synthetic one by default)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from litedetr.data import KINDS, AugmentConfig, SyntheticSpec, find_split, write_synthetic_dataset
from litedetr.engine import TrainConfig, Trainer, distributed
from litedetr.engine.recipes import FROM_SCRATCH, SMALL_DATA
from litedetr.engine.state import read_train_config
from litedetr.engine.trainer import CHECKPOINT
from litedetr.models import get_config
from litedetr.tools.args import float_in, int_at_least
from litedetr.weights import IMAGENET, WEIGHTS
from litedetr.weights.backbone import backbone_weights_file
from litedetr.weights.files import read_config
from litedetr.weights.loading import checkpoint_family

__all__ = ["add_arguments", "add_data_arguments", "resolve_data", "default_image_sizes"]

logger = logging.getLogger(__name__)

DEFAULT_LR, DEFAULT_LR_BACKBONE = TrainConfig.lr, TrainConfig.lr_backbone
"""DINO's learning rates (for ``--lr`` / ``--lr-backbone`` without ``--small-data``)."""

DETR_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
"""DETR's training short sides for 800 px evaluation; other sizes scale them."""


def default_image_sizes(preset: str) -> tuple[tuple[int, ...], int]:
    """DETR's multi-scale training sizes scaled to the preset's evaluation size, and its max size."""
    config = get_config(preset)
    factor = max(config.min_size) / 800
    return tuple(sorted({round(s * factor / 32) * 32 for s in DETR_SCALES} | {max(config.min_size)})), config.max_size


def add_data_arguments(parser: argparse.ArgumentParser, splits: tuple[str, ...]) -> None:
    group = parser.add_argument_group("data (default: the built-in synthetic dataset)")
    group.add_argument("--data", type=Path, help="a dataset folder in COCO's layout (annotations/instances_<split>*.json, <split>*/)")
    group.add_argument("--synthetic", choices=sorted(KINDS), default="shapes", help="the built-in dataset used without --data (default shapes)")
    for split in splits:
        group.add_argument(f"--{split}-json", type=Path, help=f"the {split} instances JSON (instead of --data)")
        group.add_argument(f"--{split}-images", type=Path, help=f"the {split} images folder (with --{split}-json)")


def resolve_data(args: argparse.Namespace, split: str, synthetic_root: Path) -> tuple[str, str]:
    """``(annotations, images)`` of ``split`` from ``--data``, ``--SPLIT-json/-images`` or the synthetic dataset."""
    json_path, images = getattr(args, f"{split}_json"), getattr(args, f"{split}_images")
    if json_path is not None or images is not None:
        if json_path is None or images is None:
            raise ValueError(f"--{split}-json and --{split}-images go together")
        return str(json_path), str(images)
    if args.data is None:
        root = synthetic_root if args.synthetic == "shapes" else synthetic_root.with_name(f"{synthetic_root.name}-{args.synthetic}")
        if distributed.is_main():
            write_synthetic_dataset(root, SyntheticSpec(kind=args.synthetic))
        distributed.barrier()
        args.data = root
        logger.info("no dataset given: using the built-in synthetic dataset (%s) at %s", args.synthetic, root)
    found = find_split(args.data, split)
    return str(found.annotations), str(found.images)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _override(text: str) -> tuple[str, object]:
    """``key=value`` with a JSON value (``true``, ``100``, ``[1, 2]``); anything else is a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _resumed_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """The training config of the run ``--resume`` continues, or None (a new run)."""
    checkpoint = args.out / CHECKPOINT
    return read_train_config(checkpoint) if args.resume and checkpoint.exists() else None


def _default_lr_drop(args: argparse.Namespace, resumed: dict[str, Any] | None) -> tuple[int, ...]:
    """11/12 of the run; on resume, the run's own (so that ``--epochs`` can extend a run)."""
    return tuple(resumed["lr_drop"]) if resumed is not None else (max(1, args.epochs * 11 // 12),)


INIT_LAYOUT = ("kda_query_logits",)
""":data:`FROM_SCRATCH` fields that add weights: a litedetr model file given to ``--init`` that was trained
with one brings it along, since its weights load only into a model that has them."""


def _from_scratch(args: argparse.Namespace, resumed: dict[str, Any] | None) -> dict[str, Any]:
    """:data:`FROM_SCRATCH` for a run from random weights; on resume, the run's own (it may predate them);
    from a litedetr model file (``--init``), the :data:`INIT_LAYOUT` fields it was trained with."""
    if resumed is not None:
        return {key: resumed["model_overrides"][key] for key, _ in FROM_SCRATCH if key in resumed["model_overrides"]}
    if args.init is None:
        return dict(FROM_SCRATCH)
    if Path(args.init).suffix != ".safetensors" or not Path(args.init).is_file():  # an original .pth, or a missing file (named later)
        return {}
    source = read_config(args.init)
    layout = {key: True for key in INIT_LAYOUT if getattr(source, key)}
    if layout and distributed.is_main():
        logger.info("--init %s was trained with %s, so this model has it too", args.init, ", ".join(f"{key}=true" for key in layout))
    return layout


def run(args: argparse.Namespace) -> int:
    distributed.init_from_env(torch.device(args.device))
    # every argument is checked before any work (the synthetic dataset takes minutes to write)
    sizes, max_size = default_image_sizes(args.model)
    resumed = _resumed_config(args)
    overrides = {**_from_scratch(args, resumed), **dict(args.set)}
    lr, lr_backbone = DEFAULT_LR, DEFAULT_LR_BACKBONE
    if args.small_data:
        recipe = SMALL_DATA.model_overrides(init=args.init is not None, backbone_weights=args.backbone_weights is not None)
        if resumed is not None:  # the run's own start (_from_scratch), also where it predates FROM_SCRATCH
            recipe = {key: value for key, value in recipe.items() if key not in dict(FROM_SCRATCH)}
        overrides = {**recipe, **overrides}
        lr, lr_backbone = SMALL_DATA.lr, SMALL_DATA.lr_backbone(backbone_weights=args.backbone_weights is not None)
    lr = args.lr if args.lr is not None else lr
    lr_backbone = args.lr_backbone if args.lr_backbone is not None else lr_backbone
    preset = get_config(args.model, **{k: v for k, v in overrides.items() if k not in TrainConfig.DATASET_FIELDS})
    sizes = args.image_sizes or sizes
    config = TrainConfig(
        model=args.model,
        train_annotations="",
        train_images="",
        model_overrides=overrides,
        backbone_weights=args.backbone_weights,
        init=str(args.init) if args.init else None,
        init_weights=args.init_weights,
        freeze_backbone=args.freeze_backbone,
        epochs=args.epochs,
        max_train_minutes=args.max_minutes,
        batch_size=args.batch_size,
        accumulate=args.accumulate,
        lr=lr,
        lr_backbone=lr_backbone,
        weight_decay=args.weight_decay,
        clip_norm=args.clip_norm,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        lr_drop=tuple(args.lr_drop) if args.lr_drop is not None else _default_lr_drop(args, resumed),
        image_sizes=sizes,
        max_size=args.max_size or max_size,
        augment=AugmentConfig().scaled(max(sizes) / 800),
        amp=args.amp,
        ema_decay=args.ema,
        workers=args.workers,
        seed=args.seed,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        deterministic=args.deterministic,
        device=args.device,
    )
    if args.backbone_weights is not None and distributed.is_main():  # finds (or downloads) ImageNet weights once, before any data work
        backbone_weights_file(preset.backbone, args.backbone_weights)
    distributed.barrier()
    if config.init is not None and resumed is None:
        family = checkpoint_family(config.init)
        if family != preset.family:
            raise ValueError(f"--init {config.init} is a {family} checkpoint; --model {args.model} is of the {preset.family} family")
    train_json, train_images = resolve_data(args, "train", args.out / "synthetic-data")
    has_val = args.val_json is not None or args.data is not None
    val_json, val_images = resolve_data(args, "val", args.out / "synthetic-data") if has_val else ("", "")
    config = dataclasses.replace(config, train_annotations=train_json, train_images=train_images, val_annotations=val_json, val_images=val_images)
    result = Trainer(config, args.out, resume=args.resume).fit()
    if not distributed.is_main():
        return 0
    if result.interrupted:
        print(f"interrupted after {result.steps} steps; continue with: litedetr train ... --out {args.out} --resume")
        return 130
    print(f"trained {result.epochs_done} epochs ({result.steps} steps); model: {args.out / 'model.safetensors'}")
    if result.metrics:
        print(format_metrics(result.metrics))
    return 0


def format_metrics(metrics: dict[str, float | None]) -> str:
    """The six COCO box metrics as a two-line table."""
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    values = ["-" if metrics.get(n) is None else f"{metrics[n]:.3f}" for n in names]
    return "  ".join(f"{n:>6}" for n in names) + "\n" + "  ".join(f"{v:>6}" for v in values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``litedetr train``; sets ``func``."""
    p.add_argument("--model", required=True, help="preset name (see `litedetr models`)")
    p.add_argument("--set", type=_override, nargs="+", default=[], metavar="KEY=VALUE",
                   help="change preset fields, e.g. backbone_trainable_norm=true dn_number=100 (DetectorConfig). Without --init, "
                   "KDA starts with uniform attention and adds query-only logits (kda_zero_query=true kda_query_logits=true; "
                   "=false for the authors' random start and logits)")  # fmt: skip
    add_data_arguments(p, ("train", "val"))
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, logs, model file)")
    p.add_argument("--epochs", type=int_at_least(1), default=12)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint; only --epochs (e.g. to extend a finished run), --eval-every, --workers, "
        "--device, --checkpoint-every and --max-minutes may differ from the run's, and --lr-drop defaults to the run's own",
    )
    p.add_argument("--batch-size", type=int_at_least(1), default=2, help="images per step and process (default 2)")
    p.add_argument("--accumulate", type=int_at_least(1), default=1, help="gradient accumulation steps")
    small = SMALL_DATA.model_overrides()
    p.add_argument(
        "--small-data",
        action="store_true",
        help=f"the demo's recipe for a few hundred to a few thousand images (SmallDataRecipe): {small['dn_number']} denoising queries, "
        f"every encoder proposal matched one-to-many, classification losses weighted {small['class_loss_weight']:g}, lr {SMALL_DATA.lr:g} "
        f"(the backbone {SMALL_DATA.backbone_lr:g}, or {SMALL_DATA.imagenet_backbone_ratio:g}x lr with --backbone-weights); without --init also "
        f"{small['num_queries']} queries with content from the encoder, and without --backbone-weights a trainable backbone "
        "batch norm. --set, --lr and --lr-backbone still override it",
    )
    p.add_argument("--lr", type=float_in(0, low_open=True), help=f"(default {DEFAULT_LR:g}; {SMALL_DATA.lr:g} with --small-data)")
    p.add_argument("--lr-backbone", type=float_in(0), help=f"(default {DEFAULT_LR_BACKBONE:g}; see --small-data)")
    p.add_argument("--weight-decay", type=float_in(0), default=1e-4)
    p.add_argument("--clip-norm", type=float_in(0), default=0.1, help="gradient-norm clipping (0: off)")
    p.add_argument("--lr-schedule", choices=["step", "cosine"], default="step",
                   help="step: 10x drops at --lr-drop epochs (default, DINO's); cosine: decay to 1%% over every optimiser step")  # fmt: skip
    p.add_argument("--warmup-steps", type=int_at_least(0), default=0, help="linear learning-rate warm-up over the first N optimiser steps (default 0: none)")
    p.add_argument("--lr-drop", type=int_at_least(1), nargs="+", help="epochs after which the learning rate drops 10x (default: 11/12 of the run)")
    p.add_argument("--image-sizes", type=_sizes, help="training short sides, e.g. 480,512,544 (default: DETR's, scaled to the preset)")
    p.add_argument("--max-size", type=int_at_least(1), help="longest side (default: the preset's)")
    p.add_argument(
        "--amp",
        nargs="?",
        const=True,
        default=False,
        choices=("bf16", "fp16"),
        help="mixed precision. --amp: fp16 with a gradient scaler on CUDA, bf16 on a CPU (fast only with AVX-512 BF16 or AMX, "
        "else a warning); --amp bf16: bf16 without a scaler (CPU, or CUDA with compute capability 8.0+); --amp fp16: fp16 "
        "with a gradient scaler (CUDA only)",
    )
    p.add_argument("--ema", type=float_in(0, 1, low_open=True, high_open=True), metavar="DECAY", help="keep an EMA of the weights, e.g. 0.9997")
    p.add_argument(
        "--init",
        type=Path,
        metavar="CHECKPOINT",
        help="start from a trained model: a litedetr model file or a released .pth of the preset's family (Lite-DINO, DINO, "
        "Deformable DETR, H-DETR; a standard-encoder one also starts a Lite preset). Classes whose names match the checkpoint's "
        "(COCO's for .pth files) keep their rows; optimiser and schedule start fresh (unlike --resume)",
    )
    p.add_argument(
        "--init-weights", choices=WEIGHTS, default="auto",
        help="of an --init checkpoint holding a model and its EMA: the EMA (auto, ema) or the model",
    )  # fmt: skip
    p.add_argument("--freeze-backbone", action="store_true", help="keep the backbone's weights and batch-norm statistics fixed")
    p.add_argument(
        "--backbone-weights",
        help=f"ImageNet weights for the backbone: {IMAGENET!r} (torchvision's, timm's for Swin-T, from their caches) or a local torchvision state dict",
    )
    p.add_argument(
        "--max-minutes", type=float_in(0, low_open=True),
        help="cap on the minutes of training steps: the first epoch trains whole, then the epochs left are cut to the batches that fit"
        " (measured), and given batches back when a later epoch runs faster; each change is logged (default: no cap)",
    )  # fmt: skip
    p.add_argument("--workers", type=int_at_least(0), default=2, help="data-loading processes")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-every", type=int_at_least(1), default=1, help="evaluate every N epochs")
    p.add_argument("--checkpoint-every", type=int_at_least(0), default=0, help="also checkpoint every N steps (0: per epoch only)")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms: bit-exact reruns on the CPU; on CUDA, torch's deterministic algorithms (an op without one "
        "stops the run, CUBLAS_WORKSPACE_CONFIG=:4096:8 is set) and the Triton attention untuned and without float atomics",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.set_defaults(func=run)
