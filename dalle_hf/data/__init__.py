"""Built-in training data: ShapesWorld, a deterministic world of coloured shapes with captions."""

from .shapesworld import (
    ALL_PAIRS,
    COLORS,
    DEFAULT_WEIGHTS,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    KINDS,
    POSITION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
    TRAIN_PAIRS,
    CaptionSpec,
    ObjectSpec,
    Scene,
    ShapeObject,
    ShapesWorld,
    ShapesWorldDataset,
    all_caption_words,
    caption_for,
    draw_spec,
    export_imagefolder,
    parse_caption,
    realise,
    relation_holds,
    render,
    sample_captions,
    scene_from_spec,
    to_pixel_values,
)

__all__ = [
    "ALL_PAIRS", "COLORS", "DEFAULT_WEIGHTS", "HELD_OUT_PAIRS", "IMAGE_SIZE", "KINDS", "POSITION_PHRASES",
    "RELATIONS", "SHAPES", "SIZES", "TRAIN_PAIRS", "CaptionSpec", "ObjectSpec", "Scene", "ShapeObject",
    "ShapesWorld", "ShapesWorldDataset", "all_caption_words", "caption_for", "draw_spec", "export_imagefolder",
    "parse_caption", "realise", "relation_holds", "render", "sample_captions", "scene_from_spec", "to_pixel_values",
]
