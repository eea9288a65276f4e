"""ShapesEval: a rule-based ShapesWorld detector and a compositional text-to-image benchmark."""

from .benchmark import (
    CATEGORIES,
    build_prompts,
    detector_accuracy,
    evaluate_images,
    evaluate_pipeline,
    evaluate_reconstruction,
    format_table,
    load_prompts,
    matches,
    render_prompts,
    select_prompts,
    write_prompts,
    write_report,
)
from .detector import DetectedObject, detect

__all__ = [
    "CATEGORIES", "DetectedObject", "build_prompts", "detect", "detector_accuracy", "evaluate_images",
    "evaluate_pipeline", "evaluate_reconstruction", "format_table", "load_prompts", "matches", "render_prompts",
    "select_prompts", "write_prompts", "write_report",
]
