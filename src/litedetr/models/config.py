"""Typed detector configurations and the named presets that spell the paper's models.

Preset names: ``[lite-]FAMILY-BACKBONE[-tiny][-hHlL-AxB]``, e.g. ``lite-dino-r50-h3l1-2x3`` is
Lite-DINO with a ResNet-50 and the H3L1-(2+1)x3 encoder (3 high-level scales, 1 low-level scale,
A = 2 high-level updates per block, B = 3 blocks).
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from litedetr.models.families import FAMILIES, get_family

__all__ = ["EncoderConfig", "DetectorConfig", "PRESETS", "get_config", "config_from_dict"]


@dataclass(frozen=True)
class EncoderConfig:
    """The encoder: ``lite`` (HL-(A+1)xB) or ``standard`` (every token a query in ``num_layers`` layers)."""

    kind: Literal["standard", "lite"] = "standard"
    num_layers: int = 6
    n_high: int = 3
    high_updates: int = 2
    blocks: int = 3
    d_ffn: int = 2048
    d_ffn_low: int | None = 256
    key_aware: bool = False


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that defines a detector's architecture and its inference-time behaviour."""

    family: str = "dino"
    """One of :data:`~litedetr.models.families.FAMILIES`."""
    num_classes: int = 91
    backbone: str = "resnet50"
    backbone_trainable_norm: bool = False
    """ResNet batch norm trained with every layer (from-scratch training) instead of DETR's frozen one."""
    d_model: int = 256
    num_heads: int = 8
    num_levels: int = 4
    num_points: int = 4
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    num_decoder_layers: int = 6
    decoder_ffn: int = 2048
    decoder_key_aware: bool = False
    kda_key_proj: bool = False
    """Every KDA layer samples its keys from a projection of their own (the authors' ``proj_key=True``,
    a ``key_proj`` per layer) instead of the projected values (``proj_key=False``, every released
    checkpoint's layout)."""
    kda_zero_query: bool = False
    """Every KDA layer's ``query_proj`` starts at zero, so its first attention is uniform over the
    sampled points, as plain deformable attention's; the authors start it Xavier-uniform (random
    attention). Initialisation only: the weights' layout is the same."""
    kda_query_logits: bool = False
    """Every KDA layer adds a per-point term predicted from the query (``attention_weights``, plain
    deformable attention's linear layer, zero at the start) to its ``q.k / sqrt(D)`` logits, so it can
    prefer levels and points as plain deformable attention does, and weigh the sampled keys as KDA
    does. Not in the authors' code (their checkpoints load without it); adds the layer's weights."""
    dropout: float = 0.0
    num_queries: int = 900
    num_select: int = 300
    learned_query_content: bool = True
    look_forward_twice: bool = True
    dn_number: int = 0
    dn_label_noise_ratio: float = 0.5
    dn_box_noise_scale: float = 1.0
    one_to_many_queries: int = 0
    one_to_many_repeat: int = 6
    one_to_many_weight: float = 1.0
    """H-DETR's lambda: the weight of the one-to-many group's losses."""
    encoder_one_to_many: int = 0
    """Training only, in none of the code bases (0: off, as the authors). Every ground-truth box is
    repeated this many times and Hungarian-matched over *every* encoder token's proposal, whose class
    and box losses (``*_enc_dense``) join the others. DINO supervises only the selected proposals,
    so from scratch its selection can lock onto one level whose proposals never learn to find the
    objects (``benchmarks/training_study.py``); a dense one-to-many target teaches every level's
    proposals at once. Weights and inference are unchanged."""
    query_nms: float | None = None
    """In none of the code bases (None: off, plain top-k, as the authors). Before the top-k query selection,
    an encoder proposal is passed over when a higher-scoring one overlaps it with IoU above this value
    (class-agnostic, as DDQ-DETR's distinct queries), so the decoder's queries start on distinct boxes
    rather than on copies of the few best; passed-over proposals fill in only where too few remain.
    Weights are unchanged, so it applies to any checkpoint; see
    :meth:`~litedetr.models.query_selection.QuerySelection.select`."""
    class_loss_weight: float | None = None
    """The weight of every classification loss term (matched, auxiliary, encoder, denoising, ...); None:
    the family's (DINO 1.0, Deformable DETR and H-DETR 2.0)."""
    match_class_cost: float = 2.0
    """The Hungarian matcher's weight of the class cost against the box costs (2.0: every code base's;
    the box costs stay 5 for L1 and 2 for GIoU). Training only."""
    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333
    pe_temperature: float = 20.0
    class_names: tuple[str, ...] = ()
    """Optional display name of each label ``0..num_classes-1`` (empty: labels are shown as numbers)."""
    category_ids: tuple[int, ...] = ()
    """Optional dataset category id of each label (e.g. COCO's 91-id layout), so predictions become COCO results."""

    def __post_init__(self) -> None:
        design = get_family(self.family).design
        if self.d_model % 32 or self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by 32 (GroupNorm) and by num_heads ({self.num_heads})")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.num_select > self.num_queries * self.num_classes:
            raise ValueError(f"num_select ({self.num_select}) exceeds queries x classes")
        if self.dn_number and not design.denoising:
            with_denoising = ", ".join(name for name, family in FAMILIES.items() if family.design.denoising)
            raise ValueError(f"denoising queries (dn_number={self.dn_number}) exist in the {with_denoising} family only, not {self.family!r}")
        if self.dn_number and self.one_to_many_queries:
            raise ValueError("a detector has one kind of training-only queries: set dn_number or one_to_many_queries, not both")
        if self.class_loss_weight is not None and not self.class_loss_weight > 0:
            raise ValueError(f"class_loss_weight must be > 0 (None: the family's), got {self.class_loss_weight}")
        if self.match_class_cost < 0:
            raise ValueError(f"match_class_cost must be >= 0, got {self.match_class_cost}")
        if self.query_nms is not None and not 0 < self.query_nms < 1:
            raise ValueError(f"query_nms must be an IoU in (0, 1) (None: off), got {self.query_nms}")
        if self.encoder_one_to_many < 0:
            raise ValueError(f"encoder_one_to_many must be >= 0 (0: off), got {self.encoder_one_to_many}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names given for {self.num_classes} classes")
        if self.category_ids and len(self.category_ids) != self.num_classes:
            raise ValueError(f"{len(self.category_ids)} category ids given for {self.num_classes} classes")

    def class_name(self, label: int) -> str:
        """The display name of ``label`` (its number when the config has no names)."""
        return self.class_names[label] if self.class_names else str(label)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getattr__(self, name: str) -> Any:
        """The fields' names before 0.3 (:data:`RENAMED_FIELDS`), with a ``DeprecationWarning``."""
        if name in RENAMED_FIELDS:
            warnings.warn(f"DetectorConfig.{name} is now {RENAMED_FIELDS[name]}", DeprecationWarning, stacklevel=2)
            return getattr(self, RENAMED_FIELDS[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


RENAMED_FIELDS = {"n_heads": "num_heads", "n_levels": "num_levels", "n_points": "num_points", "decoder_layers": "num_decoder_layers"}
""":class:`DetectorConfig` fields renamed in 0.3 (old -> new): model files and ``get_config`` still take the old names."""


def _renamed(fields: dict[str, Any], warn: bool) -> dict[str, Any]:
    """``fields`` under today's names; with ``warn``, a ``DeprecationWarning`` for each old one."""
    for old in sorted(set(fields) & set(RENAMED_FIELDS)):
        if warn:
            warnings.warn(f"DetectorConfig field {old!r} is now {RENAMED_FIELDS[old]!r}", DeprecationWarning, stacklevel=3)
        if RENAMED_FIELDS[old] in fields:
            raise ValueError(f"both {old!r} and its new name {RENAMED_FIELDS[old]!r} given")
        fields[RENAMED_FIELDS[old]] = fields.pop(old)
    return fields


def config_from_dict(data: dict[str, Any]) -> DetectorConfig:
    """Inverse of :meth:`DetectorConfig.to_dict` (e.g. from a checkpoint's JSON, also one written before
    the renaming of :data:`RENAMED_FIELDS`); unknown keys are an error."""
    data = _renamed(dict(data), warn=False)
    known = {f.name for f in dataclasses.fields(DetectorConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown detector config keys: {unknown}")
    encoder = EncoderConfig(**data.pop("encoder", {}))
    for key in ("min_size", "class_names", "category_ids"):
        if key in data:
            data[key] = tuple(data[key])
    return DetectorConfig(encoder=encoder, **data)


def _lite(n_high: int, a: int, b: int, d_ffn: int) -> EncoderConfig:
    """The paper's HL-(A+1)xB encoder with KDA and the low-level tokens' 256-wide FFN."""
    return EncoderConfig("lite", n_high=n_high, high_updates=a, blocks=b, d_ffn=d_ffn, d_ffn_low=256, key_aware=True)


def _family_base(name: str) -> DetectorConfig:
    """The base preset of family ``name``: the dataclass's defaults with the family's own fields."""
    defaults = dict(FAMILIES[name].defaults)
    return DetectorConfig(family=name, encoder=EncoderConfig(**defaults.pop("encoder", {})), **defaults)


_BACKBONES = {"r50": "resnet50", "r101": "resnet101", "swint": "swin_t"}
_LITE_VARIANTS = {"h3l1-2x3": (3, 2, 3), "h3l1-3x2": (3, 3, 2), "h3l1-6x1": (3, 6, 1), "h2l2-2x3": (2, 2, 3)}


def _tiny(config: DetectorConfig) -> DetectorConfig:
    """A CPU-sized variant: ResNet-18, d_model 128, 3 decoder layers, few queries, small images."""
    return dataclasses.replace(
        config,
        backbone="resnet18",
        d_model=128,
        num_heads=4,
        encoder=dataclasses.replace(config.encoder, d_ffn=256, d_ffn_low=64 if config.encoder.kind == "lite" else None),
        num_decoder_layers=3,
        decoder_ffn=256,
        dropout=0.0,
        num_queries=60,
        num_select=60,
        dn_number=20 if config.dn_number else 0,
        one_to_many_queries=120 if config.one_to_many_queries else 0,
        one_to_many_repeat=3 if config.one_to_many_queries else config.one_to_many_repeat,
        min_size=(320,),
        max_size=512,
    )


def _build_presets() -> dict[str, DetectorConfig]:
    presets: dict[str, DetectorConfig] = {}
    for family in FAMILIES:
        base = _family_base(family)
        for tag, backbone in _BACKBONES.items():
            standard = dataclasses.replace(base, backbone=backbone)
            presets[f"{family}-{tag}"] = standard
            for variant, (h, a, b) in _LITE_VARIANTS.items():
                presets[f"lite-{family}-{tag}-{variant}"] = dataclasses.replace(standard, encoder=_lite(h, a, b, base.encoder.d_ffn), decoder_key_aware=True)
        presets[f"{family}-r18-tiny"] = _tiny(base)
        presets[f"lite-{family}-r18-tiny-h3l1-2x3"] = _tiny(presets[f"lite-{family}-r50-h3l1-2x3"])
    return presets


PRESETS: dict[str, DetectorConfig] = _build_presets()
"""Every named preset; ``litedetr models`` lists them."""


def suggest_presets(name: str) -> str:
    """The closest preset names to ``name`` (those that extend it first), and how to list them all."""
    extending = sorted(p for p in PRESETS if p.startswith(name))
    close = [p for p in difflib.get_close_matches(name, PRESETS, n=6, cutoff=0.6) if p not in extending]
    names = (extending + close)[:6]
    return (f"did you mean {', '.join(names)}? " if names else "") + "`litedetr models` lists them all"


def get_config(name: str, **overrides: Any) -> DetectorConfig:
    """The preset ``name`` with fields replaced by ``overrides`` (e.g. ``num_classes=20``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; {suggest_presets(name)}")
    overrides = _renamed(overrides, warn=True)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(DetectorConfig)})
    if unknown:
        raise ValueError(f"unknown DetectorConfig fields {unknown}")
    if isinstance(overrides.get("encoder"), dict):
        overrides["encoder"] = dataclasses.replace(PRESETS[name].encoder, **overrides["encoder"])
    return dataclasses.replace(PRESETS[name], **overrides)
