"""The three learned components, one file each; `register_auto_classes()` makes them loadable with Auto*."""

from .alignment import DalleAlignmentConfig, DalleAlignmentModel, DalleAlignmentOutput
from .image_decoder import DalleDecoderCache, DalleImageDecoder, DalleImageDecoderConfig, DalleImageDecoderOutput
from .text_encoder import DalleTextEncoder, DalleTextEncoderConfig, DalleTextEncoderOutput

COMPONENTS = {
    "text_encoder": (DalleTextEncoderConfig, DalleTextEncoder),
    "image_decoder": (DalleImageDecoderConfig, DalleImageDecoder),
    "alignment": (DalleAlignmentConfig, DalleAlignmentModel),
}


def register_auto_classes() -> None:
    """Register each config/model pair with `AutoConfig` / `AutoModel` (idempotent)."""
    from transformers import AutoConfig, AutoModel

    for config_cls, model_cls in COMPONENTS.values():
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
        except ValueError:  # already registered
            pass
        try:
            AutoModel.register(config_cls, model_cls)
        except ValueError:
            pass


__all__ = [
    "DalleAlignmentConfig", "DalleAlignmentModel", "DalleAlignmentOutput", "DalleDecoderCache",
    "DalleImageDecoder", "DalleImageDecoderConfig", "DalleImageDecoderOutput", "DalleTextEncoder",
    "DalleTextEncoderConfig", "DalleTextEncoderOutput", "COMPONENTS", "register_auto_classes",
]
