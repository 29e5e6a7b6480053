"""Data: the synthetic COCO-format generator, the COCO dataset and the detection transforms.

Boxes are absolute ``xyxy`` float tensors; COCO ``[x, y, w, h]`` only in the JSON files.
This package imports no Ray, MLflow or SQLAlchemy.
"""

from .coco import CocoDetection, DatasetError, collate, fingerprint
from .synth import CATEGORIES, SynthInfo, generate_synthetic
from .transforms import (
    AugmentConfig,
    DetectionTransform,
    Letterbox,
    boxes_to_original,
    letterbox_geometry,
)

__all__ = [
    "CATEGORIES",
    "AugmentConfig",
    "CocoDetection",
    "DatasetError",
    "DetectionTransform",
    "Letterbox",
    "SynthInfo",
    "boxes_to_original",
    "collate",
    "fingerprint",
    "generate_synthetic",
    "letterbox_geometry",
]
