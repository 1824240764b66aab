"""Backbones (torchvision ResNets, fc removed) and the projector / predictor MLPs of PAPER.md."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock

FEATURE_DIMS = {"resnet10": 512, "resnet18": 512, "resnet50": 2048, "resnet101": 2048}


def build_backbone(arch: str, cifar_stem: bool = False) -> nn.Module:
    """ResNet trunk returning pooled features (N x 512 or N x 2048); `fc` is an Identity.

    resnet10 (BasicBlock, one block per stage) is a small CPU-friendly trunk for the quickstart
    and tests; the paper's runs use resnet18/50/101.
    """
    if arch == "resnet10":
        net = resnet.ResNet(BasicBlock, [1, 1, 1, 1])
    elif arch in FEATURE_DIMS:
        net = getattr(resnet, arch)()
    else:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(FEATURE_DIMS)}")
    if cifar_stem:  # small images: keep resolution through the stem
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def mlp(in_dim: int, hidden_dim: int, out_dim: int, bn_hidden: bool) -> nn.Sequential:
    """Linear -> [BN] -> ReLU -> Linear: MoCo v2 (no BN) and MoCo v2+/BYOL (BN) heads."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not bn_hidden)]
    if bn_hidden:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
    return nn.Sequential(*layers)


def forward_in_groups(net: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
    """Forward `groups` sub-batches separately so each gets its own BN statistics (one-process
    emulation of per-GPU BN, used by shuffle-BN)."""
    if groups <= 1:
        return net(x)
    return torch.cat([net(chunk) for chunk in x.chunk(groups)])
