"""The detector: backbone -> input stage -> encoder -> query selection -> decoder -> heads.

A family (Deformable DETR, DINO, H-DETR) is a choice of these parts, made in
:mod:`litedetr.models.families`; this module only wires them, as the paper's figure does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from litedetr.models.config import DetectorConfig
from litedetr.models.families import build_parts
from litedetr.models.inputs import ImageInput, as_image_list, batched
from litedetr.models.postprocess import postprocess
from litedetr.models.transform import batch_images
from litedetr.ops import box_xyxy_to_cxcywh

__all__ = ["Detector"]


class Detector(nn.Module):
    """A multi-scale deformable DETR.

    ``model(images)`` in eval mode: a list of ``(3, H, W)`` float images in [0, 1] (any sizes) ->
    one dict per image with ``boxes (N, 4)`` absolute ``xyxy`` in the image's pixels, ``scores (N,)``
    and ``labels (N,)``. In training mode ``model(images, targets)`` with targets ``boxes (N, 4)``
    absolute ``xyxy`` and ``labels (N,)`` in ``[0, num_classes)`` returns the weighted losses (their
    sum is the training objective).

    Args:
        config: the architecture.
        backbone_weights: optional local file of ImageNet weights for the backbone.
    """

    def __init__(self, config: DetectorConfig, backbone_weights: str | None = None):
        super().__init__()
        self.config = config
        parts = build_parts(config, backbone_weights)
        self.backbone = parts.backbone
        self.input_stage = parts.input_stage
        self.encoder = parts.encoder
        self.query_selection = parts.query_selection
        self.training_queries = parts.training_queries
        self.decoder = parts.decoder
        self.heads = parts.heads
        self.criterion = parts.criterion

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu", preset: str | None = None) -> Detector:
        """A detector in eval mode from a litedetr model file, or from an authors' ``.pth`` checkpoint with ``preset``.

        Args:
            path: a ``.safetensors`` file written by :func:`~litedetr.models.checkpoint.save_model`, or the
                authors' released ``.pth`` (state dict under ``model``).
            device: where the model goes.
            preset: the preset an authors' checkpoint was trained as (e.g. ``lite-dino-r50-h3l1-2x3``);
                only for ``.pth`` files, whose config is not stored in the file.
        """
        from litedetr.models.checkpoint import load_model, load_official_checkpoint  # checkpoint imports this module

        if not Path(path).is_file():
            raise ValueError(f"{path}: no such checkpoint file")
        if preset is not None:
            return load_official_checkpoint(path, preset, device)
        if Path(path).suffix in (".pth", ".pt"):
            raise ValueError(f"{path}: an authors' .pth checkpoint does not store its architecture; pass its preset")
        return load_model(path, device)

    @torch.no_grad()
    def predict(self, inputs: ImageInput | Sequence[ImageInput], threshold: float = 0.3, batch_size: int = 4) -> list[dict[str, Any]]:
        """Detections for one image or many, in batches of ``batch_size``, in eval mode (the mode is restored after).

        Args:
            inputs: file paths, PIL images, ``(H, W, 3)`` uint8 arrays or ``(3, H, W)`` tensors (float in
                [0, 1] or uint8), one or a sequence (see :mod:`litedetr.models.inputs`).
            threshold: keep detections scoring at least this.

        Returns:
            per image, in input order: ``boxes (N, 4)`` xyxy pixels of the original image (clipped to it),
            ``scores (N,)`` descending, ``labels (N,)`` and ``names`` (N class names), on the CPU.
        """
        device, was_training = self.input_stage.level_embed.device, self.training
        self.eval()
        results = []
        try:
            for images in batched(as_image_list(inputs), batch_size):
                for image, pred in zip(images, self([img.to(device) for img in images])):
                    keep = pred["scores"] >= threshold
                    h, w = image.shape[1:]
                    boxes = pred["boxes"][keep].cpu()
                    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
                    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
                    labels = pred["labels"][keep].cpu()
                    names = [self.config.class_name(int(c)) for c in labels]
                    results.append({"boxes": boxes, "scores": pred["scores"][keep].cpu(), "labels": labels, "names": names})
        finally:
            self.train(was_training)
        return results

    def forward(self, images: list[Tensor] | Tensor, targets: list[dict[str, Tensor]] | None = None) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        if self.training and targets is None:
            raise ValueError("training mode needs targets; call model.eval() for inference")
        batch = batch_images(images, self.config.min_size, self.config.max_size, self.training)
        features = self.backbone(batch.tensors)
        if not self.training:
            outputs = self.forward_features(features, batch.mask)
            return postprocess(outputs["pred_logits"], outputs["pred_boxes"], batch.sizes, self.config.num_select)
        normalized = [self._normalize_target(t, size, i) for i, (t, size) in enumerate(zip(targets, batch.sizes.tolist()))]
        outputs = self.forward_features(features, batch.mask, normalized)
        losses = self.criterion(outputs, normalized)
        return {key: self.criterion.weight(key) * value for key, value in losses.items() if self.criterion.weight(key) is not None}

    def _normalize_target(self, target: dict[str, Tensor], size: list[int], index: int) -> dict[str, Tensor]:
        """Absolute ``xyxy`` boxes -> normalised ``cxcywh``, with checks that name the image."""
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or len(boxes) != len(labels):
            raise ValueError(f"target {index}: boxes must be (N, 4) with N labels, got {tuple(boxes.shape)} and {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.config.num_classes):
            raise ValueError(f"target {index}: labels must lie in [0, {self.config.num_classes}), got {labels.unique().tolist()}")
        if len(boxes) and not bool(((boxes[:, 2:] > boxes[:, :2]).all())):
            raise ValueError(f"target {index}: boxes must have x1 > x0 and y1 > y0 (absolute xyxy)")
        h, w = size
        scale = boxes.new_tensor([w, h, w, h])
        return {"boxes": box_xyxy_to_cxcywh(boxes / scale), "labels": labels.long()}

    def forward_features(self, features: list[Tensor], image_mask: Tensor, targets: list[dict[str, Tensor]] | None = None) -> dict[str, Any]:
        """Raw predictions from backbone maps.

        Args:
            features: backbone maps, finest first (C3, C4, C5).
            image_mask: ``(B, H, W)`` True = padding.
            targets: in training, normalised ``cxcywh`` boxes and labels (for denoising queries).

        Returns:
            ``pred_logits (B, Q, K)``, ``pred_boxes (B, Q, 4)`` normalised ``cxcywh``, ``aux_outputs``
            (the same for every earlier decoder layer), ``enc_outputs`` (the proposals the query
            selection supervises); in training also ``dn_outputs`` + ``dn_meta`` (denoising) or
            ``one_to_many`` (H-DETR's hybrid branch).
        """
        tokens = self.input_stage(features, image_mask)
        memory = self.encoder(tokens.src, tokens.pos, tokens.spatial_shapes, tokens.valid_ratios, tokens.padding_mask)
        num_queries = self.config.num_queries + (self.training_queries.extra_selected if self.training else 0)
        queries, enc_outputs = self.query_selection(memory, tokens, num_queries)
        if self.training:
            queries = self.training_queries(queries, targets)
        hidden, references = self.decoder(
            queries.content,
            queries.reference,
            queries.position,
            memory,
            tokens.spatial_shapes,
            tokens.valid_ratios,
            tokens.padding_mask,
            self.heads.box_per_layer,
            queries.attn_mask,
        )
        layers = self.heads(hidden, references)

        def group(name: str) -> dict[str, Any]:
            part = queries.groups[name]
            per_layer = [{key: value[:, part] for key, value in layer.items()} for layer in layers]
            return {**per_layer[-1], "aux_outputs": per_layer[:-1]}

        outputs = {**group("one_to_one"), "enc_outputs": enc_outputs}
        if "dn" in queries.groups:
            outputs["dn_outputs"], outputs["dn_meta"] = group("dn"), queries.dn_meta
        if "one_to_many" in queries.groups:
            outputs["one_to_many"] = group("one_to_many")
        return outputs
