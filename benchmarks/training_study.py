"""Why the demo's Lite-DINO trains badly: one change at a time, each over several training seeds.

Every cell trains the demo's model (:class:`litedetr.engine.recipes.DemoRecipe`: Lite-DINO
H3L1-(2+1)x3 on the ``*-r18-tiny`` backbone and widths, the synthetic shapes dataset at 160x160,
batch 4, lr 4e-4 dropped 10x for the last epoch) with one change, for each training seed, and
reports the median and the range (min-max) over the seeds of the final validation AP and AP50, and of
the last decoder layer's training losses over the last 50 steps (class, L1, GIoU): the losses tell
apart what the AP of a short run cannot.

Cells (``--cells``):

- ``kda``: the authors' Lite-DINO, KDA in the encoder and in the decoder's cross-attention.
- ``kda-zero-query``: the same with ``query_proj`` zero-initialised, so KDA starts with uniform
  weights over the sampled points, exactly where plain deformable attention starts.
- ``kda-encoder``: KDA in the encoder only, plain deformable attention (MSDA) in the decoder.
- ``msda``: MSDA in the encoder and the decoder.
- ``kda-warmup``: the authors' Lite-DINO with the learning rate warmed up linearly over the first
  ``WARMUP_STEPS`` optimiser steps.
- ``msda-warmup``: MSDA with the same warm-up.
- ``kda-lr1e-4``: the authors' Lite-DINO at lr 1e-4 (DINO's), backbone included;
  ``kda-lr1e-4-backbone``: lr 1e-4 with the backbone at the demo's 4e-4.
- ``kda-clip1``: gradient-norm clipping at 1 instead of DINO's 0.1.
- ``kda-dn20``: 20 denoising queries instead of 100 (the ``*-tiny`` presets' own count).
- ``kda-dense`` / ``msda-dense``: every encoder token's proposal also matched one-to-many against the
  targets repeated ``DENSE_REPEAT`` times (``DetectorConfig.encoder_one_to_many``; the demo's recipe).
- ``kda-dense-q200``: ``kda-dense`` with 200 decoder queries (100 detections kept) instead of 60.
- ``kda-dense-class2``: ``kda-dense`` with every classification loss weighted 2 instead of DINO's 1;
  ``kda-dense-q200-class2``: both changes.
- ``kda-dense-o2m``: ``kda-dense`` with H-DETR's hybrid matching in the decoder
  (``DECODER_ONE_TO_MANY`` extra queries matched to the targets repeated ``DENSE_REPEAT`` times)
  instead of the denoising queries.
- ``recipe-*``: the demo's recipe (``kda-dense-q200-class2``) with one change more: ``recipe-msda``
  plain deformable attention in the encoder and decoder; ``recipe-lr1e-3`` / ``recipe-lr2e-3`` a
  higher learning rate (backbone too); ``recipe-encoder-content`` the decoder's content queries taken
  from the selected encoder features (DINO's "pure" query selection, no learned content embedding),
  and ``recipe-encoder-content-class4`` / ``-class8`` / ``-class16`` that with the classification losses
  weighted 4 / 8 / 16; at class weight 8 (the demo's model), ``-class8-cosine`` the cosine decay,
  ``-class8-drop3`` / ``-class8-drop4`` the 10x drop after epoch 3 / 4 instead of 5,
  ``-class8-drops45`` a 10x drop after epoch 4 and another after 5, ``-class8-late-drop`` the same
  steps in 12 epochs of half the batches with the drop after the 11th (only the last twelfth of
  the steps at the low rate), ``-class8-match-class8`` the Hungarian matcher's class cost 8 instead of
  2 (``DetectorConfig.match_class_cost``), ``-class8-backbone-lr1e-3`` / ``-lr2e-3`` the
  backbone at lr 1e-3 / 2e-3, ``-class8-backbone-lr1e-3-late-drop`` both changes,
  ``-class8-msda-backbone-lr1e-3`` the backbone at 1e-3 with MSDA, ``-class8-kda-encoder`` KDA in the encoder only (MSDA in the decoder) and
  ``-class8-msda`` plain deformable attention (MSDA) in the encoder and decoder;
  at class weight 2,
  ``-cosine`` with a cosine learning-rate decay over all steps instead of the 10x drop,
  ``-backbone-lr1e-3`` with the backbone at lr 1e-3, ``-msda`` with plain deformable attention;
  ``recipe-batch2`` batches of 2, twice the steps per epoch (the same images).

Besides AP and the training losses, each run records what tells a stuck run from one that learns
(:func:`diagnose`): the share of the selected proposals that come from the finest level, and the
L1 box loss of the encoder's proposals and of each decoder layer, for matched and for denoising
queries.

``--steps-per-epoch`` shortens each of the 6 epochs (0: the demo's full 250; each epoch still draws
its batches from its own shuffle of all 1000 images, and the learning rate still drops before the
last one). Each run is a subprocess with ``--threads`` threads, ``--jobs`` at a time: the figures are
accuracies after a fixed number of steps, which other jobs on the machine do not change (only the
wall time). Runs go to ``--runs``; a finished run is reused and an interrupted one resumed, so the
study can be stopped and started again. Writes ``training_study_<steps>steps.md`` and ``.json`` to
``--out`` (``..._seeds<seeds>`` for seeds other than 0 1 2, ``..._init_<file stem>`` with ``--init``).

    python benchmarks/training_study.py [--cells kda msda ...] [--seeds 0 1 2] [--steps-per-epoch 50]
        [--jobs 2] [--threads 1] [--runs training-study-runs] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from litedetr.bench.runs import run_in_parallel, train_or_reuse
from litedetr.data import CocoDetection, collate, find_split, write_synthetic_dataset
from litedetr.engine import TrainConfig
from litedetr.engine.precision import resolve_precision
from litedetr.engine.recipes import DemoRecipe, demo_train_config
from litedetr.engine.run_log import read_log
from litedetr.models import get_config
from litedetr.ops import box_iou, level_shapes
from litedetr.weights import load_model

LOSS_TERMS = ("loss_class", "loss_bbox", "loss_giou")
WARMUP_STEPS = 100
DENSE_REPEAT = 6
DECODER_ONE_TO_MANY = 180
LAST_STEPS = 50


@dataclass(frozen=True)
class Cell:
    """One configuration of the study: :class:`DetectorConfig` changes and :class:`TrainConfig` changes."""

    label: str
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)


AUTHORS_OVERRIDES = {"backbone_trainable_norm": True, "dn_number": 100}
"""The demo's model as the authors' Lite-DINO (KDA in the decoder too), with the demo's from-scratch
backbone and denoising; every cell starts from these, not from :class:`DemoRecipe`'s own overrides."""


STUDY_TRAINING = {"lr": 4e-4, "lr_backbone": 4e-4, "epochs": 6, "lr_drop": (5,)}
"""The schedule every cell starts from (the demo's when the study began), fixed here so that a change of
:class:`DemoRecipe` leaves every cell's runs as they were."""


RECIPE_OVERRIDES = {"encoder_one_to_many": DENSE_REPEAT, "num_queries": 200, "num_select": 100, "class_loss_weight": 2.0}
"""What the demo's recipe adds to :data:`AUTHORS_OVERRIDES` (``recipe-*`` cells change one thing more)."""


ENCODER_CONTENT = {**RECIPE_OVERRIDES, "learned_query_content": False}
""":data:`RECIPE_OVERRIDES` with the decoder's content queries taken from the selected encoder features
(``recipe-encoder-content*`` cells; with class weight 8 it is :class:`DemoRecipe`'s model)."""


CLASS8 = {**ENCODER_CONTENT, "class_loss_weight": 8.0}
""":data:`ENCODER_CONTENT` with class losses weighted 8: :class:`DemoRecipe`'s model but for KDA's start (``recipe-encoder-content-class8*`` cells)."""


DEMO_TRAINING = {"lr_backbone": 1e-3, "epochs": 12, "lr_drop": (11,)}
"""What :class:`DemoRecipe`'s schedule changes in :data:`STUDY_TRAINING`: a backbone at lr 1e-3 and the
drop for the last twelfth of the steps (``demo-*`` cells: :data:`CLASS8`'s model with the demo's schedule and one
change; ``demo-query-nms-query-logits`` is :class:`DemoRecipe` itself)."""


DEMO_MODEL = {**CLASS8, "kda_zero_query": True}
""":class:`DemoRecipe`'s model before ``query_nms`` (``demo-kda-zero-query``, with :data:`DEMO_TRAINING`); the
``demo-*`` cells after it change one thing more; ``demo-query-nms`` was the demo until KDA's query logits joined it
(``demo-query-nms-query-logits``, the demo itself)."""


def cells() -> dict[str, Cell]:
    base = get_config(DemoRecipe.model)
    msda_encoder = dataclasses.replace(base.encoder, key_aware=False)
    msda = {"encoder": msda_encoder, "decoder_key_aware": False}
    return {
        "kda": Cell("KDA in encoder and decoder (the authors' Lite-DINO)"),
        "kda-zero-query": Cell("KDA, query_proj zero-initialised (uniform start)", {"kda_zero_query": True}),
        "kda-encoder": Cell("KDA in the encoder, MSDA in the decoder", {"decoder_key_aware": False}),
        "msda": Cell("MSDA in encoder and decoder", {"encoder": msda_encoder, "decoder_key_aware": False}),
        "kda-warmup": Cell(f"KDA, lr warm-up over {WARMUP_STEPS} steps", train_overrides={"warmup_steps": WARMUP_STEPS}),
        "msda-warmup": Cell(
            f"MSDA, lr warm-up over {WARMUP_STEPS} steps", {"encoder": msda_encoder, "decoder_key_aware": False}, {"warmup_steps": WARMUP_STEPS}
        ),
        "kda-lr1e-4": Cell("KDA, lr 1e-4 (backbone too)", train_overrides={"lr": 1e-4, "lr_backbone": 1e-4}),
        "kda-lr1e-4-backbone": Cell("KDA, lr 1e-4, backbone 4e-4", train_overrides={"lr": 1e-4}),
        "kda-clip1": Cell("KDA, gradient clipping at norm 1", train_overrides={"clip_norm": 1.0}),
        "kda-dn20": Cell("KDA, 20 denoising queries", {"dn_number": 20}),
        "kda-dense": Cell(f"KDA, every token's proposal matched one-to-many ({DENSE_REPEAT}x)", {"encoder_one_to_many": DENSE_REPEAT}),
        "msda-dense": Cell(
            f"MSDA, every token's proposal matched one-to-many ({DENSE_REPEAT}x)",
            {"encoder": msda_encoder, "decoder_key_aware": False, "encoder_one_to_many": DENSE_REPEAT},
        ),
        "kda-dense-q200": Cell(
            "KDA, dense encoder matching, 200 queries (100 kept) instead of 60", {"encoder_one_to_many": DENSE_REPEAT, "num_queries": 200, "num_select": 100}
        ),
        "kda-dense-class2": Cell(
            "KDA, dense encoder matching, class losses weighted 2 (Deformable DETR's) instead of 1",
            {"encoder_one_to_many": DENSE_REPEAT, "class_loss_weight": 2.0},
        ),
        "kda-dense-q200-class2": Cell("KDA, dense encoder matching, 200 queries (100 kept), class losses weighted 2", RECIPE_OVERRIDES),
        "recipe-msda": Cell("MSDA, dense encoder matching, 200 queries (100 kept), class losses weighted 2", {**RECIPE_OVERRIDES, **msda}),
        "recipe-lr1e-3": Cell("KDA, dense, 200 queries, class 2, lr 1e-3 (backbone too)", RECIPE_OVERRIDES, {"lr": 1e-3, "lr_backbone": 1e-3}),
        "recipe-encoder-content": Cell(
            "KDA, dense, 200 queries, class 2, content = the selected encoder features (DINO's pure query selection)", ENCODER_CONTENT
        ),
        **{
            f"recipe-encoder-content-class{weight}": Cell(
                f"KDA, dense, 200 queries, content from the encoder, class losses weighted {weight}", {**ENCODER_CONTENT, "class_loss_weight": float(weight)}
            )
            for weight in (4, 8, 16)
        },
        **{
            f"recipe-encoder-content-class8-drop{epoch}": Cell(
                f"KDA, dense, 200 queries, content from the encoder, class 8, the 10x drop after epoch {epoch} of 6 (not 5)",
                CLASS8,
                {"lr_drop": (epoch,)},
            )
            for epoch in (3, 4)
        },
        "recipe-encoder-content-class8-drops45": Cell(
            "KDA, dense, 200 queries, content from the encoder, class 8, a 10x drop after epochs 4 and 5 (lr/100 in the last)",
            CLASS8,
            {"lr_drop": (4, 5)},
        ),
        "recipe-encoder-content-class8-late-drop": Cell(
            "KDA, dense, 200 queries, content from the encoder, class 8, the 10x drop for the last twelfth of the steps (not the last sixth)",
            CLASS8,
            {"epochs": 12, "lr_drop": (11,)},
        ),
        "recipe-encoder-content-class8-match-class8": Cell(
            "KDA, dense, 200 queries, content from the encoder, class 8, the matcher's class cost 8 (not 2)", {**CLASS8, "match_class_cost": 8.0}
        ),
        "recipe-encoder-content-class8-backbone-lr1e-3": Cell(
            "KDA, dense, 200 queries, content from the encoder, class 8, backbone lr 1e-3 (the rest 4e-4)", CLASS8, {"lr_backbone": 1e-3}
        ),
        "recipe-encoder-content-class8-backbone-lr2e-3": Cell(
            "KDA, dense, 200 queries, content from the encoder, class 8, backbone lr 2e-3 (the rest 4e-4)", CLASS8, {"lr_backbone": 2e-3}
        ),
        "recipe-encoder-content-class8-backbone-lr1e-3-late-drop": Cell(
            "KDA, dense, 200 queries, content from the encoder, class 8, backbone lr 1e-3, the 10x drop for the last twelfth of the steps",
            CLASS8,
            DEMO_TRAINING,
        ),
        "demo-msda": Cell("MSDA in encoder and decoder, the demo's schedule", {**CLASS8, **msda}, DEMO_TRAINING),
        "demo-kda-encoder": Cell("KDA in the encoder, MSDA in the decoder, the demo's schedule", {**CLASS8, "decoder_key_aware": False}, DEMO_TRAINING),
        "demo-kda-zero-query": Cell("KDA, query_proj zero-initialised (uniform start), the demo's schedule", DEMO_MODEL, DEMO_TRAINING),
        "demo-kda-key-proj": Cell(
            "KDA, keys from a projection of their own (random query_proj), the demo's schedule", {**CLASS8, "kda_key_proj": True}, DEMO_TRAINING
        ),
        "demo-kda-key-proj-zero-query": Cell(
            "KDA, keys from a projection of their own, query_proj zero-initialised, the demo's schedule",
            {**CLASS8, "kda_key_proj": True, "kda_zero_query": True},
            DEMO_TRAINING,
        ),
        "demo-batch2": Cell("KDA's uniform start, in batches of 2 (twice the steps, the same images)", DEMO_MODEL, {**DEMO_TRAINING, "batch_size": 2}),
        "demo-lr6e-4": Cell("KDA's uniform start, lr 6e-4 (the backbone at 1e-3)", DEMO_MODEL, {**DEMO_TRAINING, "lr": 6e-4}),
        "demo-query-nms": Cell(
            "KDA's uniform start, queries selected among distinct proposals (query_nms 0.7: a proposal overlapped above IoU 0.7 "
            "by a higher-scoring one is passed over): the demo's recipe before KDA's query logits",
            {**DEMO_MODEL, "query_nms": 0.7},
            DEMO_TRAINING,
        ),
        "demo-query-nms-query-logits": Cell(
            "KDA's uniform start, distinct queries (query_nms 0.7) and query-only logits added to q.k (kda_query_logits): the demo's recipe now",
            {**DEMO_MODEL, "query_nms": 0.7, "kda_query_logits": True},
            DEMO_TRAINING,
        ),
        "demo-msda-query-nms": Cell(
            "MSDA in encoder and decoder, queries selected among distinct proposals (query_nms 0.7), the demo's schedule",
            {**DEMO_MODEL, **msda, "query_nms": 0.7},
            DEMO_TRAINING,
        ),
        "demo-clip1": Cell("KDA's uniform start, gradient clipping at norm 1 (not 0.1)", DEMO_MODEL, {**DEMO_TRAINING, "clip_norm": 1.0}),
        "recipe-encoder-content-class8-msda-backbone-lr1e-3": Cell(
            "MSDA, dense, 200 queries, content from the encoder, class 8, backbone lr 1e-3 (the rest 4e-4)", {**CLASS8, **msda}, {"lr_backbone": 1e-3}
        ),
        "recipe-encoder-content-class8-kda-encoder": Cell(
            "KDA in the encoder, MSDA in the decoder, dense, 200 queries, content from the encoder, class 8", {**CLASS8, "decoder_key_aware": False}
        ),
        "recipe-encoder-content-class8-msda": Cell(
            "MSDA, dense, 200 queries, content from the encoder, class 8 (the demo's recipe with MSDA)", {**CLASS8, **msda}
        ),
        "recipe-encoder-content-class8-cosine": Cell(
            "KDA, dense, 200 queries, content from the encoder, class losses weighted 8, cosine learning-rate decay",
            CLASS8,
            {"lr_schedule": "cosine"},
        ),
        "recipe-encoder-content-cosine": Cell(
            "KDA, dense, 200 queries, class 2, content from the encoder, cosine learning-rate decay over all steps (no 10x drop)",
            ENCODER_CONTENT,
            {"lr_schedule": "cosine"},
        ),
        "recipe-encoder-content-backbone-lr1e-3": Cell(
            "KDA, dense, 200 queries, class 2, content from the encoder, backbone lr 1e-3 (the rest 4e-4)", ENCODER_CONTENT, {"lr_backbone": 1e-3}
        ),
        "recipe-encoder-content-msda": Cell("MSDA, dense, 200 queries, class 2, content from the encoder", {**ENCODER_CONTENT, **msda}),
        "recipe-batch2": Cell("KDA, dense, 200 queries, class 2, batches of 2 (twice the steps, the same images)", RECIPE_OVERRIDES, {"batch_size": 2}),
        "recipe-lr2e-3": Cell("KDA, dense, 200 queries, class 2, lr 2e-3 (backbone too)", RECIPE_OVERRIDES, {"lr": 2e-3, "lr_backbone": 2e-3}),
        "kda-dense-o2m": Cell(
            f"KDA, dense encoder matching, {DECODER_ONE_TO_MANY} one-to-many decoder queries ({DENSE_REPEAT}x) instead of denoising",
            {"encoder_one_to_many": DENSE_REPEAT, "dn_number": 0, "one_to_many_queries": DECODER_ONE_TO_MANY, "one_to_many_repeat": DENSE_REPEAT},
        ),
    }


def run_dir(runs: Path, cell: str, seed: int, steps_per_epoch: int, init: Path | None = None) -> Path:
    start = f"-init-{init.stem}" if init else ""
    return runs / f"{cell}{start}-seed{seed}-steps{steps_per_epoch or 'full'}"


def cell_config(cell_name: str, seed: int, steps_per_epoch: int, data: Path, init: Path | None = None) -> TrainConfig:
    """The training run of one cell and seed on the dataset at ``data``: :class:`DemoRecipe`'s, with
    :data:`AUTHORS_OVERRIDES`, :data:`STUDY_TRAINING` and the cell's changes, ``steps_per_epoch`` x 6 steps
    whatever the cell's batch size or epoch count, evaluated after the last epoch only."""
    cell = cells()[cell_name]
    recipe = DemoRecipe()
    config = dataclasses.replace(
        demo_train_config(recipe, data, "cpu"),
        model_overrides={**AUTHORS_OVERRIDES, **cell.model_overrides},
        seed=seed,
        epoch_batches=steps_per_epoch,
        workers=1,
        init=str(init) if init else None,
        **{**STUDY_TRAINING, **cell.train_overrides},
    )
    # the same images in all: more, shorter epochs for more epochs; more, smaller steps for smaller batches
    images = steps_per_epoch * STUDY_TRAINING["epochs"] * recipe.batch_size
    return dataclasses.replace(config, epoch_batches=images // (config.epochs * config.batch_size), eval_every=config.epochs)


def train_one(cell_name: str, seed: int, steps_per_epoch: int, runs: Path, init: Path | None = None) -> dict[str, Any]:
    """Train (or reuse) one run and return its result (also written to ``result.json`` in its folder).

    ``init``: a model file to start from (``TrainConfig.init``) instead of the seed's draw of initial
    weights; the seed still orders the batches."""
    config = cell_config(cell_name, seed, steps_per_epoch, write_synthetic_dataset(runs / "data", DemoRecipe().data), init)
    out = run_dir(runs, cell_name, seed, steps_per_epoch, init)
    started = time.perf_counter()
    metrics, _ = train_or_reuse(config, out)
    train = read_log(out, "train")[-LAST_STEPS:]
    result = {
        "cell": cell_name,
        "seed": seed,
        "init": str(init) if init else None,
        "steps": max(r["step"] for r in read_log(out)),
        "precision": "bf16" if resolve_precision(config.amp, config.device).autocast else "float32",
        "AP": metrics["AP"],
        "AP50": metrics["AP50"],
        **{term: statistics.mean(r[term] for r in train) for term in LOSS_TERMS},
        "seconds": round(time.perf_counter() - started, 1),
        **diagnose(out / "model.safetensors", config),
        "errors": error_breakdown(out / "detections_val.json", config.val_annotations),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def diagnose(model_file: Path, config: Any, images: int = 16) -> dict[str, Any]:
    """What tells a stuck run from one that learns, on the first ``images`` validation images.

    ``finest_share``: the share of the selected proposals (the decoder's anchors) that come from the
    finest (stride-8) level. ``box_l1``: the L1 box loss of the encoder's proposals and of every
    decoder layer, for the matched queries and for the denoising ones (training mode, no gradient):
    a decoder that refines its boxes lowers it layer by layer. ``outside_weight``: per encoder layer, the
    share of its attention weight on samples that lie outside their level's map (no bilinear corner
    inside: a zero value, and for KDA a zero key), a way of attending to nothing; ``outside_samples``:
    the share of such samples.
    """
    model = load_model(model_file)
    dataset = CocoDetection(config.val_annotations, config.val_images)
    batch, targets = collate([dataset[i] for i in range(images)])
    picked: list[Tensor] = []
    select = model.query_selection.select
    model.query_selection.select = lambda scores, k, boxes=None: picked.append(select(scores, k, boxes)) or picked[-1]
    shapes: list[Any] = []
    model.input_stage.register_forward_hook(lambda module, inputs, tokens: shapes.append(level_shapes(tokens.spatial_shapes)))
    captured: dict[int, tuple[Tensor, Tensor]] = {}
    for i, layer in enumerate(model.encoder.layers):
        layer.self_attn.capture = lambda locations, weights, i=i: captured.setdefault(i, (locations, weights))
    torch.manual_seed(0)
    with torch.no_grad():
        model.eval()
        model(list(batch))
        outside = {i: (_outside_map(locations, shapes[0]), weights) for i, (locations, weights) in sorted(captured.items())}
        (height, width), *_ = shapes[0]  # the finest level's tokens come first
        share = float((picked[0] < height * width).float().mean())
        model.train()
        losses = model(list(batch), list(targets))
    layers = model.config.num_decoder_layers
    return {
        "finest_share": share,
        "outside_weight": [float((weights * out).sum() / weights.sum()) for out, weights in outside.values()],
        "outside_samples": [float(out.float().mean()) for out, _ in outside.values()],
        "box_l1": {
            "encoder": float(losses["loss_bbox_enc"]),
            "decoder": [float(losses[f"loss_bbox_{i}"]) for i in range(layers - 1)] + [float(losses["loss_bbox"])],
            "denoising": [float(losses[f"loss_bbox_dn_{i}"]) for i in range(layers - 1)] + [float(losses["loss_bbox_dn"])] if "loss_bbox_dn" in losses else [],
        },
    }


def _outside_map(locations: Tensor, shapes: Any) -> Tensor:
    """``(B, Lq, M, L, P, 2)`` sampling locations in [0, 1] -> ``(B, Lq, M, L, P)`` True where no bilinear
    corner lies in the level's ``(H, W)`` map (``grid_sample``'s ``align_corners=False`` convention)."""
    size = torch.tensor(shapes, dtype=locations.dtype)  # (L, 2) as (H, W)
    x = locations[..., 0] * size[:, 1, None] - 0.5
    y = locations[..., 1] * size[:, 0, None] - 0.5
    return (x <= -1) | (x >= size[:, 1, None]) | (y <= -1) | (y >= size[:, 0, None])


ERROR_KINDS = ("correct", "wrong_class", "duplicate", "background")


def error_breakdown(detections_file: Path, annotations_file: str | Path) -> dict[str, float]:
    """What a run's best detections are, on the validation split: for each image, its ``N`` highest-scoring
    detections (``N``: its number of objects), each counted as ``correct`` (IoU >= 0.5 with an object of
    its class not yet found), ``wrong_class`` (IoU >= 0.5 with an object of another class),
    ``duplicate`` (an object of its class already found) or ``background``; shares of all of them."""
    truth = json.loads(Path(annotations_file).read_text())
    objects: dict[int, list[dict[str, Any]]] = {}
    for annotation in truth["annotations"]:
        objects.setdefault(annotation["image_id"], []).append(annotation)
    found: dict[int, list[dict[str, Any]]] = {}
    for detection in json.loads(detections_file.read_text()):
        found.setdefault(detection["image_id"], []).append(detection)
    xyxy = lambda box: [box[0], box[1], box[0] + box[2], box[1] + box[3]]  # noqa: E731
    counts = dict.fromkeys(ERROR_KINDS, 0)
    for image, truths in objects.items():
        boxes = torch.tensor([xyxy(a["bbox"]) for a in truths])
        hit: set[int] = set()
        for detection in sorted(found.get(image, []), key=lambda d: -d["score"])[: len(truths)]:
            iou, _ = box_iou(torch.tensor([xyxy(detection["bbox"])]), boxes)
            best = int(iou[0].argmax())
            if iou[0, best] < 0.5:
                counts["background"] += 1
            elif truths[best]["category_id"] != detection["category_id"]:
                counts["wrong_class"] += 1
            elif best in hit:
                counts["duplicate"] += 1
            else:
                counts["correct"] += 1
                hit.add(best)
    total = max(1, sum(counts.values()))
    return {kind: count / total for kind, count in counts.items()}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Demo's model and data; {meta['steps']} training steps of {meta['batch_size']} images per run"
        f" ({meta['steps_per_epoch']} per epoch x 6, lr drop before the last); seeds {meta['seeds']}. "
        "Median [min-max] over the seeds; AP in %; losses: the last decoder layer's, mean of the last 50 steps."
        " Finest share: the share of the decoder's anchors selected from the stride-8 level; box L1 (16 validation"
        " images): the encoder's proposals -> the last decoder layer, and the denoising queries' first -> last layer."
        " Best detections: of each validation image's N highest-scoring detections (N: its objects), the % correct,"
        " of the wrong class, duplicates and background (medians)."
        + (f" Every run starts from the initial weights in `{Path(meta['init']).name}`; the seed orders the batches." if meta.get("init") else "")
        + f" Training precision: {', '.join(meta['precisions'])} (`amp='auto'`: bf16 autocast where the CPU computes bf16 natively);"
        f" summarised on a CPU of capability {meta['cpu_capability']}.",
        "",
        "| cell | AP50 | AP | class loss | L1 loss | GIoU loss | finest share | box L1 enc -> last | denoising L1 first -> last"
        " | best detections: correct / wrong class / duplicate / background |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells_ = [row["label"]]
        for key, scale, digits in (("AP50", 100, 1), ("AP", 100, 1), ("loss_class", 1, 3), ("loss_bbox", 1, 3), ("loss_giou", 1, 3), ("finest_share", 1, 2)):
            s = row[key]
            cells_.append(f"{scale * s['median']:.{digits}f} [{scale * s['min']:.{digits}f}-{scale * s['max']:.{digits}f}]")
        for first, last in (("enc", "last"), ("dn_first", "dn_last")):
            cells_.append("-" if math.isnan(row[first]["median"]) else f"{row[first]['median']:.2f} -> {row[last]['median']:.2f}")
        cells_.append(" / ".join(f"{100 * row[kind]['median']:.0f}" for kind in ERROR_KINDS))
        lines.append("| " + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


def _box_columns(run: dict[str, Any]) -> dict[str, float]:
    """The per-run box L1 figures the table shows (encoder, last decoder layer, denoising first and last)."""
    l1 = run["box_l1"]
    denoising = l1["denoising"] or [math.nan]  # no denoising queries: NaN, shown as "-"
    return {"enc": l1["encoder"], "last": l1["decoder"][-1], "dn_first": denoising[0], "dn_last": denoising[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=list(cells()), choices=list(cells()))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps-per-epoch", type=int, default=50, help="batches per epoch (0: the demo's full 250)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each a subprocess")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--runs", type=Path, default=Path("training-study-runs"))
    parser.add_argument("--init", type=Path, help="start every run from this model file instead of the seed's initial weights")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--run", nargs=2, metavar=("CELL", "SEED"), help=argparse.SUPPRESS)  # one run, in a worker process
    args = parser.parse_args()
    if args.run:
        torch.set_num_threads(args.threads)
        train_one(args.run[0], int(args.run[1]), args.steps_per_epoch, args.runs, args.init)
        return

    write_synthetic_dataset(args.runs / "data", DemoRecipe().data)  # once, before the workers
    todo = [(c, s) for c in args.cells for s in args.seeds if not (run_dir(args.runs, c, s, args.steps_per_epoch, args.init) / "result.json").exists()]
    commands = [
        ([sys.executable, __file__, "--run", cell_name, str(seed), "--steps-per-epoch", str(args.steps_per_epoch), "--threads", str(args.threads),
          "--runs", str(args.runs)] + (["--init", str(args.init)] if args.init else []),
         run_dir(args.runs, cell_name, seed, args.steps_per_epoch, args.init).with_suffix(".log"))
        for cell_name, seed in todo
    ]  # fmt: skip
    run_in_parallel(commands, args.jobs)

    results = []
    for cell_name in args.cells:
        found = [run_dir(args.runs, cell_name, s, args.steps_per_epoch, args.init) / "result.json" for s in args.seeds]
        missing = [str(p.parent) for p in found if not p.exists()]
        if missing:
            raise SystemExit(f"runs did not finish (see their .log files): {', '.join(missing)}")
        per_seed = [json.loads(p.read_text()) for p in found]
        for path, run in zip(found, per_seed):  # runs recorded before the breakdown existed
            if "errors" not in run:
                run["errors"] = error_breakdown(path.parent / "detections_val.json", find_split(args.runs / "data", "val").annotations)
        row = {"cell": cell_name, "label": cells()[cell_name].label, "runs": per_seed}
        row.update({key: _summary([r[key] for r in per_seed]) for key in ("AP", "AP50", *LOSS_TERMS, "finest_share")})
        row.update({key: _summary([_box_columns(r)[key] for r in per_seed]) for key in ("enc", "last", "dn_first", "dn_last")})
        row.update({kind: _summary([r["errors"][kind] for r in per_seed]) for kind in ERROR_KINDS})
        results.append(row)
    recipe = DemoRecipe()
    steps_per_epoch = args.steps_per_epoch or -(-recipe.data.num_train // recipe.batch_size)
    meta = {"steps_per_epoch": steps_per_epoch, "steps": steps_per_epoch * STUDY_TRAINING["epochs"], "batch_size": recipe.batch_size,
            "seeds": args.seeds, "init": str(args.init) if args.init else None, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "precisions": sorted({run.get("precision", "not recorded") for row in results for run in row["runs"]})}  # fmt: skip
    table = markdown(results, meta)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = "" if args.seeds == [0, 1, 2] else "_seeds" + "-".join(map(str, args.seeds))
    name = f"training_study_{meta['steps']}steps{seeds}" + (f"_init_{args.init.stem}" if args.init else "")
    (args.out / f"{name}.md").write_text(table)
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "cells": results}, indent=2))


if __name__ == "__main__":
    main()
