"""dalle-hf: a DALL-E-style text-to-image system, native to the Hugging Face stack."""

import os

from .models import (
    DalleAlignmentConfig,
    DalleAlignmentModel,
    DalleImageDecoder,
    DalleImageDecoderConfig,
    DalleTextEncoder,
    DalleTextEncoderConfig,
    register_auto_classes,
)
from .pipeline_dalle import DallePipeline, DallePipelineOutput

__version__ = "0.1.0"

#: The embedded default model: a `from_pretrained` folder shipped inside the package (trained on ShapesWorld).
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")

register_auto_classes()

__all__ = [
    "DEFAULT_MODEL",
    "DalleAlignmentConfig",
    "DalleAlignmentModel",
    "DalleImageDecoder",
    "DalleImageDecoderConfig",
    "DalleTextEncoder",
    "DalleTextEncoderConfig",
    "DallePipeline",
    "DallePipelineOutput",
    "register_auto_classes",
]
