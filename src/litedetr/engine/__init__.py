"""Training and evaluation: the loop, checkpoints, COCO metrics, multi-process helpers."""

from litedetr.engine.config import TrainConfig
from litedetr.engine.evaluate import coco_metrics, evaluate
from litedetr.engine.trainer import CHECKPOINT, MODEL_FILE, Trainer, TrainingDiverged, TrainResult

__all__ = ["TrainConfig", "Trainer", "TrainResult", "TrainingDiverged", "evaluate", "coco_metrics", "CHECKPOINT", "MODEL_FILE"]
