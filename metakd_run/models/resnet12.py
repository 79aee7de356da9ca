"""The ResNet-12 of few-shot learning (TADAM, MetaOptNet), with MAML-style batch norm."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from metakd_run.models.norm import MetaBatchNorm2d

NEGATIVE_SLOPE = 0.1


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    # No bias: every conv feeds a batch norm, which would cancel it.
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)


class ResidualBlock(nn.Module):
    """Three 3x3 conv+norm (LeakyReLU 0.1 between), plus a 1x1 conv+norm shortcut, then
    LeakyReLU and a 2x2 max-pool (which halves H and W, floor)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.norm1 = MetaBatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.norm2 = MetaBatchNorm2d(out_channels)
        self.conv3 = _conv3x3(out_channels, out_channels)
        self.norm3 = MetaBatchNorm2d(out_channels)
        self.shortcut_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.shortcut_norm = MetaBatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.norm1(self.conv1(x)), NEGATIVE_SLOPE)
        h = F.leaky_relu(self.norm2(self.conv2(h)), NEGATIVE_SLOPE)
        h = self.norm3(self.conv3(h))
        h = F.leaky_relu(h + self.shortcut_norm(self.shortcut_conv(x)), NEGATIVE_SLOPE)
        return F.max_pool2d(h, kernel_size=2)


class ResNet12(nn.Module):
    """Four residual blocks of ``widths`` channels, global average pool, linear ``head``.

    3x84x84 inputs give 5x5 maps after the fourth block and a ``widths[-1]`` embedding. Parameters
    are named ``block{i}.conv{1,2,3}.weight``, ``block{i}.norm{1,2,3}.*``,
    ``block{i}.shortcut_{conv,norm}.*`` and ``head.*``; features ``block1``..``block4`` (after each
    pool) and ``embedding`` (pooled, the head's input). No DropBlock: MAML's inner loop and its
    second-order gradients are cleaner without stochastic layers.

    Init: Kaiming normal (fan-out, leaky ReLU) for convs, as in MetaOptNet; Xavier uniform weight
    and zero bias for the head; norm weight 1, bias 0.
    """

    head_prefix = "head."
    embedding_tap = "embedding"

    def __init__(
        self, in_shape: Sequence[int], out_dim: int, widths: Sequence[int] = (64, 160, 320, 640)
    ) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"ResNet12 takes (channels, H, W) inputs, got shape {tuple(in_shape)}")
        widths = [int(w) for w in widths]
        if not widths:
            raise ValueError("ResNet12 needs at least one width")
        channels, height, width = (int(s) for s in in_shape)
        if min(height, width) < 2 ** len(widths):
            raise ValueError(
                f"widths={list(widths)} is invalid: an input of {tuple(in_shape)} is too small for "
                f"{len(widths)} max-pools; use a larger dataset.image_size"
            )
        self.num_blocks = len(widths)
        for i, out_channels in enumerate(widths, start=1):
            self.add_module(f"block{i}", ResidualBlock(channels, out_channels))
            channels = out_channels
        self.embedding_dim = channels
        self.head = nn.Linear(channels, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, MetaBatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats: dict[str, Tensor] = {}
        h = x
        for i in range(1, self.num_blocks + 1):
            h = getattr(self, f"block{i}")(h)
            feats[f"block{i}"] = h
        h = h.mean(dim=(2, 3))
        feats["embedding"] = h
        return self.head(h), feats
