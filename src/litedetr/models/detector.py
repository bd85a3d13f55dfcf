"""The detector: backbone -> input stage -> encoder -> query selection -> decoder -> heads.

A family (Deformable DETR, DINO, H-DETR) is a choice of these parts, made in
:mod:`litedetr.models.families` and built by :mod:`litedetr.models.parts`; this module only wires them, as the paper's figure does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from litedetr.models.config import DetectorConfig
from litedetr.models.image_batch import batch_images
from litedetr.models.inputs import ImageInput, as_image_list, batches_by_size
from litedetr.models.parts import DetectorParts, build_parts
from litedetr.models.postprocess import kept_detections, postprocess
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
        parts: the parts to wire (e.g. :func:`~litedetr.models.parts.build_parts` with one replaced);
            ``None``: those ``config``'s family builds. They must fit ``config``, which the detector
            reads for its sizes, post-processing and checkpoint files.
    """

    def __init__(self, config: DetectorConfig, parts: DetectorParts | None = None):
        super().__init__()
        self.config = config
        parts = build_parts(config) if parts is None else parts
        self.backbone = parts.backbone
        self.input_stage = parts.input_stage
        self.encoder = parts.encoder
        self.query_selection = parts.query_selection
        self.training_queries = parts.training_queries
        self.decoder = parts.decoder
        self.heads = parts.heads
        self.criterion = parts.criterion

    @torch.no_grad()
    def predict(self, inputs: ImageInput | Sequence[ImageInput], threshold: float = 0.3, batch_size: int = 4) -> list[dict[str, Any]]:
        """Detections for one image or many, in batches of ``batch_size``, in eval mode (the mode is restored after).

        Images are batched by size (:func:`~litedetr.models.inputs.batches_by_size`): equally sized
        images share a batch and are predicted as alone. An image batched with a larger one is padded,
        and, as in the original code bases, three things see the padding: the backbone's features near
        the image's right and bottom borders and the input projection's group norm; the two-stage
        top-k, where padded tokens (their memory zeroed) can take query slots; and DINO's positional
        queries, computed from boxes in the padded frame. Everything else reads only the image's
        own tokens.

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
        images = as_image_list(inputs)
        results: list[dict[str, Any]] = [{} for _ in images]
        try:
            for batch in batches_by_size(images, batch_size):
                for (index, image), pred in zip(batch, self([img.to(device) for _, img in batch])):
                    size = (image.shape[1], image.shape[2])
                    results[index] = kept_detections(pred["boxes"], pred["scores"], pred["labels"], size, threshold, self.config.class_name)
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
        normalized = self._normalize_targets(targets, batch.sizes)
        outputs = self.forward_features(features, batch.mask, normalized)
        losses = self.criterion(outputs, normalized)
        return self.criterion.weighted(losses)

    def _normalize_targets(self, targets: list[dict[str, Tensor]], sizes: Tensor) -> list[dict[str, Tensor]]:
        """Absolute ``xyxy`` boxes in images of ``sizes (B, 2)`` = ``(H, W)`` -> normalised ``cxcywh``.

        Checked with one host read for the whole batch; a bad target is named by its image.
        """
        if len(targets) != len(sizes):
            raise ValueError(f"{len(targets)} targets given for {len(sizes)} images; pass one per image")
        for index, target in enumerate(targets):
            boxes, labels = target["boxes"], target["labels"]
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or len(boxes) != len(labels):
                raise ValueError(f"target {index}: boxes must be (N, 4) with N labels, got {tuple(boxes.shape)} and {tuple(labels.shape)}")
        problems = torch.stack([self._target_problems(target) for target in targets])
        if problems.any():
            index, kind = problems.nonzero()[0].tolist()
            if kind == 0:
                raise ValueError(f"target {index}: labels must lie in [0, {self.config.num_classes}), got {targets[index]['labels'].unique().tolist()}")
            raise ValueError(f"target {index}: boxes must have x1 > x0 and y1 > y0 (absolute xyxy)")
        scales = sizes.flip(1).repeat(1, 2)  # (w, h, w, h) per image, on the device: no host read
        return [
            {"boxes": box_xyxy_to_cxcywh(target["boxes"] / scale.to(target["boxes"])), "labels": target["labels"].long()}
            for target, scale in zip(targets, scales)
        ]

    def _target_problems(self, target: dict[str, Tensor]) -> Tensor:
        """``(2,)`` bool on the target's device: a label outside ``[0, K)``; a box without ``x1 > x0`` and ``y1 > y0``."""
        boxes, labels = target["boxes"], target["labels"]
        bad_label = ((labels < 0) | (labels >= self.config.num_classes)).any()
        bad_box = ~(boxes[:, 2:] > boxes[:, :2]).all()
        return torch.stack([bad_label, bad_box])

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
            ``one_to_many`` (H-DETR's hybrid branch), and ``enc_dense`` (every token's proposal) with
            ``encoder_one_to_many``.
        """
        tokens = self.input_stage(features, image_mask)
        memory = self.encoder(tokens.src, tokens.pos, tokens.spatial_shapes, tokens.valid_ratios, tokens.padding_mask)
        num_queries = self.config.num_queries + (self.training_queries.extra_selected if self.training else 0)
        queries, enc_outputs = self.query_selection(memory, tokens, num_queries)
        if self.training:
            queries = self.training_queries(queries, targets)
        hidden, references = self.decoder(
            content=queries.content,
            reference=queries.reference,
            static_position=queries.position,
            memory=memory,
            spatial_shapes=tokens.spatial_shapes,
            valid_ratios=tokens.valid_ratios,
            memory_padding_mask=tokens.padding_mask,
            box_heads=self.heads.box_per_layer,
            self_attn_mask=queries.attn_mask,
        )
        layers = self.heads(hidden, references)

        def group(name: str) -> dict[str, Any]:
            part = queries.groups[name]
            per_layer = [{key: value[:, part] for key, value in layer.items()} for layer in layers]
            return {**per_layer[-1], "aux_outputs": per_layer[:-1]}

        outputs = {**group("one_to_one"), "enc_outputs": {key: value for key, value in enc_outputs.items() if key != "dense"}}
        if "dense" in enc_outputs:
            outputs["enc_dense"] = enc_outputs["dense"]
        if "dn" in queries.groups:
            outputs["dn_outputs"], outputs["dn_meta"] = group("dn"), queries.dn_meta
        if "one_to_many" in queries.groups:
            outputs["one_to_many"] = group("one_to_many")
        return outputs
