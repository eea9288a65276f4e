"""DalleAlignmentModel: the shared discrete latent space and the text-image alignment score.

(a) A vector-quantised autoencoder: a conv encoder maps an image to a grid of latents, each snapped to the nearest
    entry of an l2-normalised codebook (cosine lookup in a low-dimensional space keeps the codebook well used); a conv
    decoder maps codes back to pixels. It is trained with reconstruction and adversarial losses; the patch
    discriminator lives in `dalle_hf.training` and is not part of these weights.
(b) A contrastive head: a small Transformer pools the quantised latent grid into an image embedding, an MLP projects
    the text encoder's pooled vector into the same space, and `score` is their scaled cosine (CLIP-style). Scoring works
    from codes directly, so candidates are reranked without decoding and re-encoding pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .layers import AttentionPool, EncoderBlock


class DalleAlignmentConfig(PretrainedConfig):
    r"""
    Configuration of a [`DalleAlignmentModel`].

    Args:
        image_size (`int`, defaults to 64): Side of the square images, in pixels.
        num_channels (`int`, defaults to 3): Image channels.
        patch_size (`int`, defaults to 4): The first conv cuts the image into `patch_size` x `patch_size` patches.
        block_out_channels (`list[int]`, defaults to `[64, 256]`): Channels per resolution level after the patchify
            conv; each level after the first halves the resolution, so the downsampling factor is
            `patch_size * 2 ** (len(block_out_channels) - 1)`.
        layers_per_block (`int`, defaults to 1): Residual blocks per level in the encoder (the decoder has one more).
        codebook_size (`int`, defaults to 512): Number of discrete codes.
        codebook_dim (`int`, defaults to 32): Dimension of the (l2-normalised) code vectors.
        commitment_cost (`float`, defaults to 0.25): Weight of the commitment term of the quantisation loss.
        text_embed_dim (`int`, defaults to 256): Size of the text encoder's `text_embeds`.
        projection_dim (`int`, defaults to 128): Size of the shared embedding space of the contrastive head.
        contrastive_width (`int`, defaults to 128): Width of the image tower over the latent grid.
        contrastive_layers (`int`, defaults to 2): Transformer blocks in the image tower.
        contrastive_heads (`int`, defaults to 4): Attention heads in the image tower.
        logit_scale_init (`float`, defaults to log(1/0.07)): Initial log temperature of the contrastive score.
        initializer_range (`float`, defaults to 0.02): Std of the normal initialisation of linear layers.
    """

    model_type = "dalle_alignment"

    def __init__(
        self,
        image_size: int = 64,
        num_channels: int = 3,
        patch_size: int = 4,
        block_out_channels: list[int] | tuple[int, ...] = (64, 256),
        layers_per_block: int = 1,
        codebook_size: int = 512,
        codebook_dim: int = 32,
        commitment_cost: float = 0.25,
        text_embed_dim: int = 256,
        projection_dim: int = 128,
        contrastive_width: int = 128,
        contrastive_layers: int = 2,
        contrastive_heads: int = 4,
        logit_scale_init: float = math.log(1 / 0.07),
        initializer_range: float = 0.02,
        **kwargs,
    ):
        block_out_channels = list(block_out_channels)
        if not block_out_channels or any(not isinstance(c, int) or c <= 0 or c % 8 for c in block_out_channels):
            raise ValueError(
                f"`block_out_channels` must be a non-empty list of positive multiples of 8, got {block_out_channels!r}."
            )
        for name in ("image_size", "num_channels", "patch_size", "layers_per_block", "codebook_size", "codebook_dim",
                     "text_embed_dim", "projection_dim", "contrastive_width", "contrastive_layers", "contrastive_heads"):
            value = locals()[name]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        factor = patch_size * 2 ** (len(block_out_channels) - 1)
        if not isinstance(image_size, int) or image_size % factor:
            raise ValueError(
                f"`image_size` ({image_size!r}) must be divisible by the downsampling factor {factor} "
                f"(patch_size * 2 ** (len(block_out_channels) - 1))."
            )
        if contrastive_width % contrastive_heads:
            raise ValueError(
                f"`contrastive_width` ({contrastive_width}) must be divisible by `contrastive_heads` ({contrastive_heads})."
            )
        self.image_size = image_size
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.block_out_channels = block_out_channels
        self.layers_per_block = layers_per_block
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.commitment_cost = commitment_cost
        self.text_embed_dim = text_embed_dim
        self.projection_dim = projection_dim
        self.contrastive_width = contrastive_width
        self.contrastive_layers = contrastive_layers
        self.contrastive_heads = contrastive_heads
        self.logit_scale_init = logit_scale_init
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def downsample_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.block_out_channels) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample_factor

    @property
    def num_codes(self) -> int:
        return self.grid_size**2


@dataclass
class DalleAlignmentOutput(ModelOutput):
    """
    Args:
        reconstruction (`torch.FloatTensor` of shape `(batch, 3, H, W)`): decoded image in [-1, 1] (not clamped).
        codes (`torch.LongTensor` of shape `(batch, grid * grid)`): the image's codes, raster order.
        quantization_loss (`torch.FloatTensor`): codebook + commitment loss.
    """

    reconstruction: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    quantization_loss: torch.FloatTensor | None = None


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class ConvEncoder(nn.Module):
    """(B, 3, H, W) -> (B, codebook_dim, H/f, W/f).

    A patchify conv (kernel = stride = `patch_size`) first, then residual blocks, halving the resolution between
    levels. Keeping the work at low resolution with wide channels is what makes the autoencoder fast on CPUs.
    """

    def __init__(self, config: DalleAlignmentConfig):
        super().__init__()
        ch = config.block_out_channels
        layers = [nn.Conv2d(config.num_channels, ch[0], config.patch_size, stride=config.patch_size)]
        for i, out_ch in enumerate(ch):
            if i > 0:
                layers.append(nn.Conv2d(ch[i - 1], out_ch, 3, stride=2, padding=1))
            layers += [ResBlock(out_ch, out_ch) for _ in range(config.layers_per_block)]
        layers += [ResBlock(ch[-1], ch[-1]), nn.GroupNorm(8, ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], config.codebook_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class ConvDecoder(nn.Module):
    """(B, codebook_dim, h, w) -> (B, 3, h*f, w*f): residual blocks, sub-pixel (pixel-shuffle) upsampling."""

    def __init__(self, config: DalleAlignmentConfig):
        super().__init__()
        ch = list(reversed(config.block_out_channels))
        layers = [nn.Conv2d(config.codebook_dim, ch[0], 3, padding=1), ResBlock(ch[0], ch[0])]
        for i, out_ch in enumerate(ch):
            if i > 0:  # (B, C, h, w) -> (B, out_ch, 2h, 2w)
                layers += [nn.Conv2d(ch[i - 1], out_ch * 4, 3, padding=1), nn.PixelShuffle(2)]
            layers += [ResBlock(out_ch, out_ch) for _ in range(config.layers_per_block + 1)]
        p = config.patch_size  # (B, C, h, w) -> (B, 3 * p * p, h, w) -> (B, 3, h * p, w * p)
        layers += [nn.GroupNorm(8, ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], config.num_channels * p * p, 3, padding=1),
                   nn.PixelShuffle(p)]
        self.layers = nn.Sequential(*layers)

    @property
    def last_layer(self) -> nn.Conv2d:
        """The output conv (the adversarial loss is balanced against the reconstruction loss at its weight)."""
        return self.layers[-2]

    def forward(self, z):
        return self.layers(z)


class CosineQuantizer(nn.Module):
    """Nearest-neighbour lookup in an l2-normalised codebook, with a straight-through gradient."""

    def __init__(self, config: DalleAlignmentConfig):
        super().__init__()
        self.commitment_cost = config.commitment_cost
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_dim)

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def lookup(self, codes: torch.LongTensor, grid: int) -> torch.Tensor:
        """(B, N) codes -> (B, d, grid, grid) normalised latents."""
        z = F.embedding(codes, self.codebook())  # (B, N, d)
        return z.transpose(1, 2).reshape(codes.shape[0], -1, grid, grid)

    def forward(self, z):
        B, d, h, w = z.shape
        z = F.normalize(z, dim=1)
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B, d, h, w) -> (B*h*w, d)
        codebook = self.codebook().to(flat.dtype)
        codes = (flat @ codebook.t()).argmax(dim=-1)  # max cosine = nearest on the sphere
        zq = F.embedding(codes, codebook).view(B, h, w, d).permute(0, 3, 1, 2)  # -> (B, d, h, w)
        loss = F.mse_loss(zq.float(), z.detach().float()) + self.commitment_cost * F.mse_loss(z.float(), zq.detach().float())
        zq = z + (zq - z).detach()
        return zq, codes.view(B, h * w), loss


class DalleAlignmentPreTrainedModel(PreTrainedModel):
    config_class = DalleAlignmentConfig
    base_model_prefix = "alignment"
    main_input_name = "pixel_values"

    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, CosineQuantizer):
            nn.init.normal_(module.embedding.weight, std=1.0)
        elif isinstance(module, AttentionPool):
            nn.init.normal_(module.query, std=self.config.initializer_range)
        elif isinstance(module, DalleAlignmentModel):
            nn.init.normal_(module.image_position, std=self.config.initializer_range)
            nn.init.constant_(module.logit_scale, self.config.logit_scale_init)
        elif isinstance(module, nn.Embedding):
            return  # the codebook is initialised above, through its quantizer
        else:
            super()._init_weights(module)


class DalleAlignmentModel(DalleAlignmentPreTrainedModel):
    """VQ autoencoder (`encode`/`decode`) plus contrastive text-image head (`score`)."""

    def __init__(self, config: DalleAlignmentConfig):
        super().__init__(config)
        self.encoder = ConvEncoder(config)
        self.quantizer = CosineQuantizer(config)
        self.decoder = ConvDecoder(config)
        W = config.contrastive_width
        self.image_in = nn.Linear(config.codebook_dim, W)
        self.image_position = nn.Parameter(torch.zeros(1, config.num_codes, W))
        self.image_blocks = nn.ModuleList(
            EncoderBlock(W, config.contrastive_heads, 4 * W) for _ in range(config.contrastive_layers)
        )
        self.image_norm = nn.LayerNorm(W)
        self.image_pool = AttentionPool(W, config.contrastive_heads)
        self.image_projection = nn.Linear(W, config.projection_dim)
        self.text_projection = nn.Sequential(
            nn.Linear(config.text_embed_dim, W), nn.GELU(), nn.Linear(W, config.projection_dim)
        )
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))
        self.post_init()

    # ---- the autoencoder -------------------------------------------------------------------------------------------

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (self.config.num_channels, size, size):
            raise ValueError(
                f"`pixel_values` must have shape (batch, {self.config.num_channels}, {size}, {size}), "
                f"got {tuple(pixel_values.shape)}."
            )

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs):
        """Autoencode: pixels -> codes -> pixels, with the quantisation loss for training."""
        self._check_pixels(pixel_values)
        zq, codes, qloss = self.quantizer(self.encoder(pixel_values.to(self.dtype)))
        reconstruction = self.decoder(zq)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return (reconstruction, codes, qloss)
        return DalleAlignmentOutput(reconstruction=reconstruction, codes=codes, quantization_loss=qloss)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """(B, 3, H, W) pixels in [-1, 1] -> (B, grid * grid) codes in raster order."""
        self._check_pixels(pixel_values)
        return self.quantizer(self.encoder(pixel_values.to(self.dtype)))[1]

    def decode(self, codes: torch.LongTensor) -> torch.Tensor:
        """(B, grid * grid) codes -> (B, 3, H, W) pixels, clamped to [-1, 1]."""
        self._check_codes(codes)
        return self.decoder(self.quantizer.lookup(codes, self.config.grid_size)).clamp(-1, 1)

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.ndim != 2 or codes.shape[1] != self.config.num_codes:
            raise ValueError(f"`codes` must have shape (batch, {self.config.num_codes}), got {tuple(codes.shape)}.")

    # ---- the contrastive head --------------------------------------------------------------------------------------

    def get_image_embeds(self, codes: torch.LongTensor) -> torch.Tensor:
        """(B, N) codes -> (B, projection_dim) l2-normalised image embeddings."""
        self._check_codes(codes)
        z = F.embedding(codes, self.quantizer.codebook())  # (B, N, d)
        x = self.image_in(z) + self.image_position
        for block in self.image_blocks:
            x = block(x)
        pooled = self.image_pool(self.image_norm(x))
        return F.normalize(self.image_projection(pooled), dim=-1)

    def get_text_embeds(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B, text_embed_dim) pooled text vectors -> (B, projection_dim) l2-normalised embeddings."""
        return F.normalize(self.text_projection(text_embeds.to(self.dtype)), dim=-1)

    def score(self, text_embeds: torch.Tensor, codes: torch.LongTensor | None = None,
              pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP-style alignment score of each (text, image) pair: (B,) scaled cosine similarities.

        Give the image as `codes` (B, N) or as `pixel_values` (B, 3, H, W), which are encoded first.
        """
        if (codes is None) == (pixel_values is None):
            raise ValueError("`score` needs exactly one of `codes` or `pixel_values`.")
        if codes is None:
            codes = self.encode(pixel_values)
        image = self.get_image_embeds(codes)
        text = self.get_text_embeds(text_embeds)
        return self.logit_scale.exp() * (image * text).sum(-1)

    def contrastive_loss(self, text_embeds: torch.Tensor, codes: torch.LongTensor,
                         negative_text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Symmetric InfoNCE over the batch: pair i is the positive of row i and of column i.

        `negative_text_embeds` (K, text_embed_dim), e.g. captions with two attributes swapped, join the texts each
        image must be told apart from (hard negatives teach the head which attribute belongs to which object).
        """
        image = self.get_image_embeds(codes)
        text = self.get_text_embeds(text_embeds)
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        labels = torch.arange(image.shape[0], device=image.device)
        texts = text if negative_text_embeds is None else torch.cat([text, self.get_text_embeds(negative_text_embeds)])
        image_to_text = scale * image @ texts.t()  # (B, B + K)
        text_to_image = scale * text @ image.t()  # (B, B)
        return (F.cross_entropy(image_to_text.float(), labels) + F.cross_entropy(text_to_image.float(), labels)) / 2
