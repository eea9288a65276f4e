"""Training with accelerate: one shared loop, three stages, and recipes that chain them."""

from .loop import Stage, TrainingArguments, make_accelerator, run_stage
from .recipe import RECIPES, get_recipe, run_recipe
from .stages import AutoencoderStage, ContrastiveStage, DataArguments, DecoderStage

__all__ = [
    "AutoencoderStage", "ContrastiveStage", "DataArguments", "DecoderStage", "RECIPES", "Stage", "TrainingArguments",
    "get_recipe", "make_accelerator", "run_recipe", "run_stage",
]
