"""The four-block convolutional network of Finn et al. (2017), MAML's image classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metakd_run.models.norm import MetaBatchNorm2d, batch_norm_2d


class ConvBlock(nn.Module):
    """3x3 conv (padding 1) -> MetaBatchNorm2d -> ReLU -> 2x2 max-pool; halves H and W (floor)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # The bias is redundant before batch norm (its gradient is exactly 0) but Finn et al. have
        # it; keeping it makes checkpoints and parameter lists match the reference architecture.
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.norm = MetaBatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu(self.norm(self.conv(x))), kernel_size=2)


class Conv4(nn.Module):
    """``blocks`` conv blocks of ``filters`` channels, flatten, linear ``head``.

    Omniglot 1x28x28 ends at ``filters x 1 x 1`` after four pools, miniImageNet 3x84x84 at
    ``filters x 5 x 5``. Parameters are named ``block{i}.conv.*``, ``block{i}.norm.*`` and
    ``head.*``; features ``block1``..``block{blocks}`` (after each pool) and ``embedding`` (the
    flattened last block, the head's input). The head is last and called ``head`` so ANIL can adapt
    it alone (``head_prefix``).

    Init, as in learn2learn's ``maml_init_`` (close to Finn et al.'s Xavier conv init): Xavier
    uniform weights and zero biases for every conv and the head; norm weight 1, bias 0.
    """

    head_prefix = "head."
    embedding_tap = "embedding"

    def __init__(self, in_shape: Sequence[int], out_dim: int, filters: int = 64, blocks: int = 4) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"Conv4 takes (channels, H, W) inputs, got shape {tuple(in_shape)}")
        if blocks < 1:
            raise ValueError(f"Conv4 needs at least one block, got {blocks}")
        channels, height, width = (int(s) for s in in_shape)
        self.num_blocks = blocks
        for i in range(1, blocks + 1):
            self.add_module(f"block{i}", ConvBlock(channels if i == 1 else filters, filters))
            height, width = height // 2, width // 2
        if height < 1 or width < 1:
            most = max(i for i in range(1, blocks + 1) if min(int(s) for s in in_shape[1:]) >> i >= 1)
            raise ValueError(
                f"blocks={blocks} is invalid: an input of {tuple(in_shape)} is too small for {blocks} "
                f"2x2 max-pools; use at most {most} blocks or a larger dataset.image_size"
            )
        self.embedding_dim = filters * height * width
        self.head = nn.Linear(self.embedding_dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, MetaBatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats: dict[str, Tensor] = {}
        h = x
        for i in range(1, self.num_blocks + 1):
            h = getattr(self, f"block{i}")(h)
            feats[f"block{i}"] = h
        h = h.flatten(1)
        feats["embedding"] = h
        return self.head(h), feats

    def batched_forward(self, params: dict[str, Tensor], x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The network for T tasks at once, each with its own parameters (leading dim T).

        ``x`` is ``[T, N, C, H, W]``. Tasks are stacked along the channel dimension,
        ``[N, T*C, H, W]``, so every convolution is one grouped convolution (``groups=T``) over
        per-task weights, and per-channel batch norm over ``T*C`` channels is exactly each task's
        own batch norm. One large op per layer replaces T small ones; plain autograd then gives
        all per-task inner gradients at once (``meta.batching=batched``).
        """
        t, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, t * x.shape[2], *x.shape[3:])
        feats: dict[str, Tensor] = {}
        for i in range(1, self.num_blocks + 1):
            block = f"block{i}"
            w = params[f"{block}.conv.weight"]
            h = F.conv2d(
                h, w.reshape(-1, *w.shape[2:]), params[f"{block}.conv.bias"].reshape(-1), padding=1, groups=t
            )
            norm = getattr(self, block).norm
            h = batch_norm_2d(
                h,
                params[f"{block}.norm.weight"].reshape(-1),
                params[f"{block}.norm.bias"].reshape(-1),
                norm.eps,
            )
            h = F.max_pool2d(F.relu(h), kernel_size=2)
            feats[block] = h.view(n, t, -1, *h.shape[2:]).transpose(0, 1)
        embedding = h.reshape(n, t, -1).transpose(0, 1)
        feats["embedding"] = embedding
        head_w, head_b = params["head.weight"], params["head.bias"]
        return torch.baddbmm(head_b.unsqueeze(1), embedding, head_w.transpose(1, 2)), feats
