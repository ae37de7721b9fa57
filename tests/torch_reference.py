"""PyTorch reference modules for the parity tests (torch only; torchvision is not needed).

Same module names and state-dict keys as torchvision's resnet18 and the EZ-VSL reference model.
Import after `pytest.importorskip("torch")`.
"""

import torch
from torch import nn
from torch.nn import functional as F


class TorchBasicBlock(nn.Module):
    def __init__(self, inp, out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet18(nn.Module):
    """torchvision.models.resnet18 layout (same state-dict keys)."""

    def __init__(self, in_channels=3, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inp = width
        for i, mult in enumerate((1, 2, 4, 8)):
            out = width * mult
            stride = 1 if i == 0 else 2
            blocks = [TorchBasicBlock(inp, out, stride), TorchBasicBlock(out, out, 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inp = out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, 1000)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TorchEZVSL(nn.Module):
    """The EZ-VSL reference model's modules and forward (image map, audio embedding)."""

    def __init__(self, width, dim):
        super().__init__()
        self.imgnet = TorchResNet18(3, width)  # keeps its fc: imgnet.fc.* must be ignored
        self.img_proj = nn.Conv2d(8 * width, dim, 1)
        self.audnet = TorchResNet18(1, width)
        self.audnet.fc = nn.Identity()
        self.aud_proj = nn.Linear(8 * width, dim)

    def forward(self, image, audio):
        v = F.normalize(self.img_proj(self.imgnet.features(image)), dim=1)
        a = F.adaptive_max_pool2d(self.audnet.features(audio), 1).flatten(1)
        a = F.normalize(self.aud_proj(a), dim=1)
        return v, a


def randomize(module, seed):
    """Random weights and random BatchNorm running statistics, so that every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0, (2.0 / fan_out) ** 0.5, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.05, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return module.eval()
