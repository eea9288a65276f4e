"""The patch discriminator of the autoencoder stage. Training only: it is never part of the saved model."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: (B, 3, H, W) -> (B, 1, H/8, W/8) real/fake logits, one per overlapping patch."""

    def __init__(self, in_channels: int = 3, width: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, num_layers):
            out = width * min(2**i, 8)
            layers += [nn.Conv2d(ch, out, 4, stride=2 if i < num_layers - 1 else 1, padding=1),
                       nn.GroupNorm(8, out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def hinge_d_loss(real_logits, fake_logits):
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
