"""The PyTorch peer: the same VGG (any config, width, FC width, input channels) in eager PyTorch.

Used only by the benchmarks, for side-by-side speed. Builds the network from
`vgg_jax.models.get_spec`, so both sides have exactly the same layers:
kxk convolutions (padding k // 2) + ReLU per stage, a 2x2 max-pool after each
stage, then FC-ReLU-dropout, FC-ReLU-dropout, FC. `score_map` runs the head
fully convolutionally (the paper's dense evaluation) with the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vgg_jax import models


class TorchVGG(nn.Module):
    """VGG A-E (no LRN/BN variants needed for speed) as a plain torch module."""

    def __init__(
        self,
        name: str,
        num_classes: int = 1000,
        width_divisor: int = 1,
        fc_width: int = 4096,
        image_size: int = 224,
        in_channels: int = 3,
        dropout_rate: float = 0.5,
    ) -> None:
        super().__init__()
        spec = models.get_spec(name)
        if spec.lrn or spec.batch_norm:
            raise ValueError(f"The torch peer builds plain A-E only, not {spec.name}.")
        blocks: list[nn.Module] = []
        channels = in_channels
        for stage, kernels in enumerate(spec.stages):
            width = max(1, models.STAGE_WIDTHS[stage] // width_divisor)
            for k in kernels:
                blocks += [nn.Conv2d(channels, width, k, padding=k // 2), nn.ReLU(inplace=True)]
                channels = width
            blocks.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*blocks)
        self.window = models.feature_map_size(image_size)
        self.fc6 = nn.Linear(channels * self.window**2, fc_width)
        self.fc7 = nn.Linear(fc_width, fc_width)
        self.fc8 = nn.Linear(fc_width, num_classes)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        x = self.dropout(F.relu(self.fc6(x)))
        x = self.dropout(F.relu(self.fc7(x)))
        return self.fc8(x)

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, classes, H', W') class scores for inputs of any size >= image_size."""
        x = self.features(x)
        k = self.window
        w6 = self.fc6.weight.view(self.fc6.out_features, -1, k, k)  # flatten order is C, H, W
        x = F.relu(F.conv2d(x, w6, self.fc6.bias))
        x = F.relu(F.conv2d(x, self.fc7.weight[:, :, None, None], self.fc7.bias))
        return F.conv2d(x, self.fc8.weight[:, :, None, None], self.fc8.bias)


def configure(device: torch.device) -> None:
    """What a PyTorch user tuning for speed sets: cuDNN picks the fastest kernels."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def to_layout(t: torch.Tensor | nn.Module, channels_last: bool):
    """Moves a 4-D tensor or a module to channels-last memory format when asked."""
    return t.to(memory_format=torch.channels_last) if channels_last else t


def make_train_step(
    net: nn.Module, lr: float = 0.01, momentum: float = 0.9, amp_dtype: torch.dtype | None = None
):
    """One SGD-momentum step on softmax cross-entropy; returns the loss tensor (no sync)."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    device_type = next(net.parameters()).device.type

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def synchronize(device: torch.device) -> None:
    """Waits for queued device work (CUDA is asynchronous; CPU eager is not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
