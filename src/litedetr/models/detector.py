"""The detector: backbone -> encoder input stage -> (standard | Lite) encoder -> query selection -> decoder -> heads.

One module serves the three families of the paper, which differ only in how decoder queries are
made and supervised (see :class:`~litedetr.models.config.DetectorConfig`):

- Deformable DETR (two-stage, iterative box refinement): queries are the encoder's top-k proposals,
  content and anchor both; references are refined with gradients stopped (look forward once).
- DINO: mixed query selection (anchors from the top-k proposals, learned content), contrastive
  denoising groups in training, look forward twice.
- H-DETR: an extra one-to-many query group, trained against targets repeated k times and masked
  from the one-to-one group in self-attention; it exists only in training.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from litedetr.models.backbone import build_backbone
from litedetr.models.config import DetectorConfig
from litedetr.models.criterion import SetCriterion
from litedetr.models.denoising import build_denoising_queries
from litedetr.models.inputs import ImageInput, as_image_list, batched
from litedetr.models.matcher import HungarianMatcher
from litedetr.models.postprocess import postprocess
from litedetr.models.transform import batch_images
from litedetr.nn import DeformableEncoder, EncoderInput, LiteEncoder, MultiScaleDeformableAttention
from litedetr.nn.decoder import DINO_INVERSE_SIGMOID_EPS, MLP, DeformableDecoder
from litedetr.ops import box_xyxy_to_cxcywh, encoder_proposals, inverse_sigmoid

__all__ = ["Detector"]


def _build_encoder(config: DetectorConfig) -> DeformableEncoder:
    enc, common = config.encoder, dict(d_model=config.d_model, n_levels=config.n_levels, n_heads=config.n_heads, n_points=config.n_points)
    if enc.kind == "lite":
        return LiteEncoder(enc.n_high, enc.high_updates, enc.blocks, d_ffn=enc.d_ffn, d_ffn_low=enc.d_ffn_low, dropout=config.dropout, key_aware=enc.key_aware, **common)
    return DeformableEncoder(enc.num_layers, d_ffn=enc.d_ffn, dropout=config.dropout, key_aware=enc.key_aware, **common)


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """``(B, S, C)`` rows picked by ``(B, K)`` indices -> ``(B, K, C)``."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def _block_diagonal_mask(sizes: list[int], device: torch.device) -> Tensor:
    """``(N, N)`` bool self-attention mask letting each group of queries see only itself (True = blocked)."""
    group = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return group[:, None] != group[None, :]


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
        d = config.d_model
        self.backbone = build_backbone(config.backbone, backbone_weights, config.backbone_trainable_norm)
        self.input_stage = EncoderInput(tuple(self.backbone.out_channels), d, config.n_levels, config.pe_temperature, config.pe_temperature)
        self.encoder = _build_encoder(config)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_class_head = nn.Linear(d, config.num_classes)
        self.enc_box_head = MLP(d, d, 4, 3)
        self.decoder = DeformableDecoder(
            config.decoder_layers, d, config.n_levels, config.n_heads, config.n_points, config.decoder_ffn, config.dropout, config.decoder_key_aware
        )
        self.class_head = nn.Linear(d, config.num_classes)
        self.box_head = MLP(d, d, 4, 3)
        self.query_content = nn.Embedding(config.num_queries + config.one_to_many_queries, d) if config.learned_query_content else None
        self.label_embed = nn.Embedding(config.num_classes + 1, d) if config.dn_number else None
        self.criterion = SetCriterion(config.num_classes, HungarianMatcher(), one_to_many_repeat=config.one_to_many_repeat)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for module in (self.encoder, self.decoder, self.enc_output):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MultiScaleDeformableAttention):
                module.reset_parameters()
        prior_bias = -math.log((1 - 0.01) / 0.01)
        for head in (self.class_head, self.enc_class_head):
            nn.init.constant_(head.bias, prior_bias)
        for head in (self.box_head, self.enc_box_head):
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        if self.query_content is not None:
            nn.init.normal_(self.query_content.weight)

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
        device, was_training = self.class_head.weight.device, self.training
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
            ``pred_logits (B, Q, K)``, ``pred_boxes (B, Q, 4)`` normalised ``cxcywh``, ``aux_outputs``,
            ``enc_outputs``; in training also ``dn_outputs`` + ``dn_meta`` (DINO) or ``one_to_many`` (H-DETR).
        """
        cfg = self.config
        tokens = self.input_stage(features, image_mask)
        memory = self.encoder(tokens.src, tokens.pos, tokens.spatial_shapes, tokens.valid_ratios, tokens.padding_mask)

        num_one_to_one = cfg.num_queries
        num_queries = num_one_to_one + (cfg.one_to_many_queries if self.training else 0)
        if memory.shape[1] < num_queries:
            raise ValueError(f"the image gives {memory.shape[1]} encoder tokens, fewer than the {num_queries} queries to select")
        proposal_memory, proposals = encoder_proposals(memory, tokens.padding_mask, tokens.spatial_shapes)
        proposal_memory = self.enc_output_norm(self.enc_output(proposal_memory))
        topk = torch.topk(self.enc_class_head(proposal_memory).max(-1).values, num_queries, dim=1).indices
        selected = _gather(proposal_memory, topk)
        anchors = self.enc_box_head(selected) + _gather(proposals, topk)
        enc_outputs = {"pred_logits": self.enc_class_head(selected), "pred_boxes": anchors.sigmoid()}
        if self.query_content is not None:
            content = self.query_content.weight[:num_queries].expand(memory.shape[0], -1, -1)
        else:
            content = selected.detach()
        reference = anchors.detach()

        attn_mask = _block_diagonal_mask([num_one_to_one, num_queries - num_one_to_one], memory.device) if num_queries > num_one_to_one else None
        dn = None
        if self.training and self.label_embed is not None:
            dn = build_denoising_queries(targets, self.label_embed, cfg.num_classes, num_queries, cfg.dn_number, cfg.dn_label_noise_ratio, cfg.dn_box_noise_scale)
        if dn is not None:
            content = torch.cat([dn.content, content], 1)
            reference = torch.cat([dn.boxes, reference], 1)
            matching_mask, attn_mask = attn_mask, dn.attn_mask.clone()
            if matching_mask is not None:
                attn_mask[dn.pad :, dn.pad :] |= matching_mask

        hidden, references = self.decoder(
            content, reference, memory, tokens.spatial_shapes, tokens.valid_ratios, tokens.padding_mask, self.box_head, attn_mask, cfg.look_forward_twice
        )
        logits = [self.class_head(h) for h in hidden]
        boxes = [(self.box_head(h) + inverse_sigmoid(r, DINO_INVERSE_SIGMOID_EPS)).sigmoid() for h, r in zip(hidden, references)]

        pad = dn.pad if dn is not None else 0
        groups = {"one_to_one": slice(pad, pad + num_one_to_one), "dn": slice(0, pad), "one_to_many": slice(pad + num_one_to_one, None)}

        def predictions(part: slice) -> dict[str, Any]:
            layers = [{"pred_logits": lg[:, part], "pred_boxes": bx[:, part]} for lg, bx in zip(logits, boxes)]
            return {**layers[-1], "aux_outputs": layers[:-1]}

        outputs = {**predictions(groups["one_to_one"]), "enc_outputs": enc_outputs}
        if dn is not None:
            outputs["dn_outputs"] = predictions(groups["dn"])
            outputs["dn_meta"] = dn.meta()
        if num_queries > num_one_to_one:
            outputs["one_to_many"] = predictions(groups["one_to_many"])
        return outputs
