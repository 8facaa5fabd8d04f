"""EDM's two denoiser backbones, ``SongUNet`` (DDPM++ / NCSN++) and ``DhariwalUNet`` (ADM), with their layers.

Written from Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", Appendix
F.2: the DDPM++/NCSN++ networks of Song et al. 2021 and the ADM network of Dhariwal & Nichol 2021 as EDM
re-implements them) and from reading NVlabs/edm's ``training/networks.py`` to get every detail of their layout
right; no code is taken from it (CC BY-NC-SA). Module tree, parameter and buffer names are EDM's, so the state
dict of an EDM network (``net.model``) loads into ours without renaming: ``map_noise``, ``map_label``,
``map_augment``, ``map_layer0/1``, ``enc[f"{res}x{res}_conv|_down|_block{i}|_aux_*"]``,
``dec[f"{res}x{res}_in0|_in1|_up|_block{i}|_aux_*"]`` (and ``out_norm``/``out_conv`` for ADM); each block holds
``norm0, conv0, affine, norm1, conv1, skip, norm2, qkv, proj``; a resampling conv holds its ``resample_filter``.

DiffMemorize's skip mask (Gu et al. 2023): ``skip_connections`` has one 0/1 per encoder output in ``enc`` order
(the stem conv, then every down and residual block), the auxiliary ``aux_*`` layers of the skip/residual
encoders excluded; a 0 stores zeros in place of that output, so the decoder concatenates zeros and shapes and
parameter counts are unchanged. As in their fork, an ``aux_skip``/``aux_residual`` layer that follows a masked
output changes the running activation but leaves the stored zeros in place.

Speed (CPU, fp32): attention uses ``scaled_dot_product_attention`` and the [1, 1] (box) resampling filter is
run as ``avg_pool2d`` / nearest upsampling, which equal EDM's depthwise (transposed) convolutions with that
filter up to fp32 rounding; other filters ([1, 3, 3, 1]) use the depthwise convolutions.
"""

from __future__ import annotations

import inspect
import math
import numbers
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffmem.common.errors import DiffmemError

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")
EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


class EDMArchitectureError(DiffmemError, ValueError):
    """Settings no EDM network can be built with (unknown type, wrong skip mask); str() is one line."""


# A bound on the residual blocks a backbone's arguments may ask for, checked before anything is built (building
# even on the meta device takes milliseconds a block, so 10^6 blocks would run for hours). The largest published
# EDM networks have 36 (ImageNet-64 ADM: 4 levels of 3 blocks) and 33 (CIFAR-10 DDPM++: 3 levels of 4).
MAX_UNET_BLOCKS = 1000


# ------------------------------------------------------------------------------------------ layers


def draw_weight(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A weight tensor drawn by the named scheme: Glorot (xavier, fan_in + fan_out) or He (kaiming, fan_in),
    uniform on ±sqrt(6/(fi+fo)) / ±sqrt(3/fi) or normal with std sqrt(2/(fi+fo)) / sqrt(1/fi)."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise EDMArchitectureError(f"unknown init mode {mode!r}; expected one of {', '.join(INIT_MODES)}")


class Linear(nn.Module):
    """y = x Wᵀ + b, W of shape [out, in], drawn by ``draw_weight`` and scaled by init_weight / init_bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(draw_weight([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(draw_weight([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), b)


def resample_kernel(taps: Sequence[float]) -> torch.Tensor:
    """The separable 2-D resampling kernel f fᵀ / (Σf)², shaped [1, 1, k, k]."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


class Conv2d(nn.Module):
    """k×k convolution (k = 0: none, resampling only) with optional 2× up/down resampling by a separable FIR
    filter applied before it (or fused with it: the convolution first when going down)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise EDMArchitectureError("a convolution resamples up or down, not both")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(draw_weight([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(draw_weight([out_channels], **fans) * init_bias) if kernel and bias else None
        self.register_buffer("resample_filter", resample_kernel(resample_filter) if up or down else None)
        taps = list(resample_filter)
        # A two-tap box filter resamples exactly like average pooling / nearest upsampling (faster on CPU).
        self._box = len(taps) == 2 and taps[0] == taps[1]

    def _up(self, x: torch.Tensor, f: torch.Tensor, padding: int) -> torch.Tensor:
        if self._box and padding == 0:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        c = x.shape[1]
        return F.conv_transpose2d(x, f.mul(4).expand(c, 1, -1, -1), groups=c, stride=2, padding=padding)

    def _down(self, x: torch.Tensor, f: torch.Tensor, padding: int) -> torch.Tensor:
        if self._box and padding == 0:
            return F.avg_pool2d(x, 2)
        c = x.shape[1]
        return F.conv2d(x, f.expand(c, 1, -1, -1), groups=c, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = self._up(x, f, max(f_pad - w_pad, 0))
            return F.conv2d(x, w, b, padding=max(w_pad - f_pad, 0))
        if self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, None, padding=w_pad + f_pad)
            x = self._down(x, f, 0)
            return x if b is None else x.add_(b.reshape(1, -1, 1, 1))
        if self.up:
            x = self._up(x, f, f_pad)
        if self.down:
            x = self._down(x, f, f_pad)
        if w is not None:
            return F.conv2d(x, w, b, padding=w_pad)
        return x if b is None else x + b.reshape(1, -1, 1, 1)


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a fresh tensor, in place when autograd is not recording it."""
    return F.silu(x, inplace=not x.requires_grad)


class GroupNorm(nn.Module):
    """Group normalisation with min(num_groups, C / min_channels_per_group) groups and an affine map."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """The residual block of DDPM++/NCSN++/ADM: GN-SiLU-conv (optionally resampling), the embedding as a bias
    (or ADM's adaptive scale and shift), GN-SiLU-dropout-conv, a (projected) shortcut, ×skip_scale; then, with
    attention, single-scale multi-head self-attention with its own residual and ×skip_scale."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: dict | None = None, init_zero: dict | None = None,
                 init_attn: dict | None = None):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = (0 if not attention else num_heads if num_heads is not None
                          else out_channels // channels_per_head)
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            # A 1×1 projection when the width changes (or when asked to project a resampled shortcut).
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(qᵀk/√c) v per head; qkv's channels are grouped per head as (c, 3) triples."""
        n, c, h, w = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm2(x)).reshape(n * heads, c // heads, 3, h * w)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [n·heads, hw, c/heads]
        a = F.scaled_dot_product_attention(q, k, v)
        # With one head the reshape is a view in channels-last strides, which the 1×1 conv after it keeps and
        # passes on: the rest of the net would run group norms and SiLUs on channels-last tensors (far slower
        # on CPU). One contiguous copy keeps every activation in NCHW, as EDM's.
        return a.transpose(1, 2).reshape(n, c, h, w).contiguous()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # The sums below are in place on fresh convolution outputs, which autograd does not keep for the
        # backward pass: one allocation less per add, which is what puts this block level with EDM's on CPU.
        # An in-place SiLU saves an allocation only where autograd is off: recording, it clones its input.
        # Dropout multiplies the SiLU's output in place (the SiLU's backward reads its input, not its output).
        orig = x
        x = self.conv0(_silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = _silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = _silu(self.norm1(x.add_(params)))
        if self.training and self.dropout:
            x = F.dropout(x, p=self.dropout, training=True, inplace=True)
        x = self.conv1(x)
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        if self.skip_scale != 1:
            x = x.mul_(self.skip_scale)
        if self.num_heads:
            x = self.proj(self.attention(x)).add_(x)
            if self.skip_scale != 1:
                x = x.mul_(self.skip_scale)
        return x


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids of the noise label c: [cos(c fᵢ), sin(c fᵢ)], fᵢ = (1/max_positions)^(i/(C/2 − e)),
    e = 1 with endpoint (DDPM++), else 0 (ADM); sin_first swaps the halves (as SongUNet uses them)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False,
                 sin_first: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint
        self.sin_first = sin_first

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=c.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(c, freqs.to(c.dtype))
        return torch.cat([x.sin(), x.cos()] if self.sin_first else [x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise label (NCSN++): [cos(2π fᵢ c), sin(2π fᵢ c)], fᵢ ~ N(0, scale²)
    fixed at construction (the ``freqs`` buffer); sin_first swaps the halves."""

    def __init__(self, num_channels: int, scale: float = 16, sin_first: bool = False):
        super().__init__()
        self.sin_first = sin_first
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        x = torch.outer(c, (2 * math.pi * self.freqs).to(c.dtype))
        return torch.cat([x.sin(), x.cos()] if self.sin_first else [x.cos(), x.sin()], dim=1)


# ------------------------------------------------------------------------------------ skip masks


def check_skip_connections(mask: Sequence[int] | None, count: int) -> list[int]:
    """The mask as a list of ``count`` 0/1 (all ones when None); EDMArchitectureError otherwise."""
    if mask is None:
        return [1] * count
    try:
        values = [int(m) for m in mask]
    except (TypeError, ValueError):
        raise EDMArchitectureError(f"skip_connections must be a list of 0/1, got {mask!r}") from None
    if len(values) != count:
        raise EDMArchitectureError(f"skip_connections has {len(values)} entries; this network has {count} encoder "
                                   f"outputs (the stem conv and every block, in encoder order): give {count} 0/1")
    if any(v not in (0, 1) for v in values) or any(float(m) != int(m) for m in mask):
        raise EDMArchitectureError(f"skip_connections takes 0/1 entries, got {','.join(map(str, mask))}")
    return values


def _label_input(class_labels: torch.Tensor | None, label_dim: int, batch: int, device) -> torch.Tensor:
    """One-hot float labels [B, label_dim] from int class indices [B] (or float one-hot rows as given);
    None gives zeros (EDM's unconditional call of a conditional network)."""
    if class_labels is None:
        return torch.zeros(1, label_dim, device=device)
    if not class_labels.is_floating_point():
        return F.one_hot(class_labels.reshape(-1).long(), label_dim).float().to(device)
    return class_labels.float().reshape(-1, label_dim)


# ---------------------------------------------------------------------------------------- SongUNet


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ (Song et al. 2021) as EDM configures them: ``model_channels`` stem, per-level widths
    ``model_channels·channel_mult``, ``num_blocks`` blocks per level, attention at ``attn_resolutions`` (every
    encoder block there, the decoder's last block there, and the lowest level's ``in0``), √½ residual scaling,
    noise embedding positional (DDPM++) or Fourier (NCSN++) of width model_channels·channel_mult_noise, encoder
    standard / skip / residual (progressive input), decoder standard / skip (progressive output)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1), skip_connections: Sequence[int] | None = None):
        for name, value, allowed in (("embedding_type", embedding_type, EMBEDDING_TYPES),
                                     ("encoder_type", encoder_type, ENCODER_TYPES),
                                     ("decoder_type", decoder_type, DECODER_TYPES)):
            if value not in allowed:
                raise EDMArchitectureError(f"SongUNet: unknown {name} {value!r}; expected one of {', '.join(allowed)}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                     init=init, init_zero=init_zero, init_attn=init_attn)

        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True, sin_first=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels, sin_first=True)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]
        self.skip_connections = check_skip_connections(skip_connections, len(skips))

        self.dec = nn.ModuleDict()
        self._consumes = set()  # decoder blocks that concatenate a skip
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
                self._consumes.add(f"{res}x{res}_block{idx}")
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            labels = _label_input(class_labels, self.map_label.in_features, x.shape[0], x.device).to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            # The one-hot label is scaled by √label_dim before its linear map.
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        aux = x
        mask = iter(self.skip_connections)
        last_masked = False
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = block(aux).add_(x)
                if not last_masked:
                    skips[-1] = x
            elif "aux_residual" in name:
                x = aux = block(aux).add_(x).div_(math.sqrt(2))
                if not last_masked:
                    skips[-1] = x
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                last_masked = not next(mask)
                skips.append(torch.zeros_like(x) if last_masked else x)

        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(_silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if name in self._consumes:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


# ------------------------------------------------------------------------------------ DhariwalUNet


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol 2021) as EDM configures it: stem and levels of width model_channels·channel_mult,
    ``num_blocks`` blocks per level with 64-channel attention heads at ``attn_resolutions``, adaptive group-norm
    scale/shift from the embedding, no residual scaling, two middle blocks (the first with attention), positional
    embedding without endpoint, labels through a bias-free linear map added after the embedding MLP.
    ``skip_connections`` masks encoder outputs as for SongUNet (our extension: DiffMemorize masks SongUNet only)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0, skip_connections: Sequence[int] | None = None):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for m in self.enc.values()]
        self.skip_connections = check_skip_connections(skip_connections, len(skips))

        self.dec = nn.ModuleDict()
        self._consumes = set()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
                self._consumes.add(f"{res}x{res}_block{idx}")
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = _label_input(class_labels, self.map_label.in_features, x.shape[0], x.device).to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = F.silu(emb)

        skips = []
        for block, keep in zip(self.enc.values(), self.skip_connections):
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x if keep else torch.zeros_like(x))
        for name, block in self.dec.items():
            if name in self._consumes:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


UNETS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


# ------------------------------------------------------------------------------------ argument checks

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxtuple = 3, 40, 40, 6, 6


def short_repr(value) -> str:
    """repr() cut to a few dozen characters and three levels (a value read from a file may be huge or nested)."""
    return _SHORT.repr(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _number(value: float) -> str:
    """A bound as written: 1048576, 0.5, 1e-12."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


@dataclass(frozen=True)
class Arg:
    """What one constructor argument takes: a kind (int, float, bool, choice, int_list, float_list, mask) and
    its range; ``problem`` says what is wrong with a value in one line, None when it fits."""

    kind: str
    lo: float | None = None  # inclusive bounds, of the value or of each item of a list
    hi: float | None = None
    choices: tuple = ()
    min_len: int = 1  # lists
    max_len: int = 64
    allow_inf: bool = False  # +inf means "no bound" (EDMPrecond's sigma_max)

    def expected(self) -> str:
        if self.kind == "choice":
            return f"one of {', '.join(map(repr, self.choices))}"
        if self.kind == "bool":
            return "a boolean"
        if self.kind == "mask":
            return f"None or a list of at most {self.max_len} 0/1"
        bounds = " and ".join([*([f">= {_number(self.lo)}"] if self.lo is not None else []),
                               *([f"<= {_number(self.hi)}"] if self.hi is not None else [])])
        inf = " (or inf)" if self.allow_inf else ""
        if self.kind in ("int", "float"):
            return f"{'an integer' if self.kind == 'int' else 'a finite number'} {bounds}{inf}".strip()
        item = "integers" if self.kind == "int_list" else "finite numbers"
        return f"a list of {self.min_len} to {self.max_len} {item}, each {bounds}"

    def _number_fits(self, value, integer: bool) -> bool:
        if not (_is_int(value) if integer else _is_real(value)):
            return False
        if not math.isfinite(value) and not (self.allow_inf and value == math.inf):
            return False
        return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)

    def fits(self, value) -> bool:
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if self.kind == "bool":
            return isinstance(value, bool) or (_is_int(value) and value in (0, 1))
        if self.kind in ("int", "float"):
            return self._number_fits(value, self.kind == "int")
        if self.kind == "mask":
            return value is None or (isinstance(value, (list, tuple)) and len(value) <= self.max_len
                                     and all(isinstance(v, numbers.Integral) and v in (0, 1) for v in value))
        if not isinstance(value, (list, tuple)) or not self.min_len <= len(value) <= self.max_len:
            return False
        return all(self._number_fits(v, self.kind == "int_list") for v in value)

    def problem(self, owner: str, name: str, value) -> str | None:
        if self.fits(value):
            return None
        return f"{owner}: {name} must be {self.expected()}, got {short_repr(value)} ({type(value).__name__})"


# Widths: every group norm takes min(32, C // 4) groups, so fewer than 4 channels make none (EDM's forward fails
# there too); past 2^20 the parameter count (--max_params) refuses anyway.
_CHANNELS = Arg("int", 4, 1 << 20)
_MULTIPLIER = Arg("int", 1, 1 << 10)
_FRACTION = Arg("float", 0, 1)

# Every constructor argument of each backbone (the test suite checks that each signature is covered).
UNET_ARGS: dict[str, dict[str, Arg]] = {
    "SongUNet": dict(
        img_resolution=Arg("int", 1, 1 << 14), in_channels=Arg("int", 1, 1 << 12),
        out_channels=Arg("int", 1, 1 << 13), label_dim=Arg("int", 0, 1 << 20), augment_dim=Arg("int", 0, 1 << 12),
        model_channels=_CHANNELS, channel_mult=Arg("int_list", 1, 1 << 10, max_len=16),
        channel_mult_emb=_MULTIPLIER, num_blocks=Arg("int", 0, MAX_UNET_BLOCKS),
        attn_resolutions=Arg("int_list", 1, 1 << 14, min_len=0), dropout=_FRACTION, label_dropout=_FRACTION,
        embedding_type=Arg("choice", choices=EMBEDDING_TYPES), channel_mult_noise=_MULTIPLIER,
        encoder_type=Arg("choice", choices=ENCODER_TYPES), decoder_type=Arg("choice", choices=DECODER_TYPES),
        resample_filter=Arg("float_list", -1e6, 1e6, max_len=16), skip_connections=Arg("mask", max_len=1 << 16)),
}
UNET_ARGS["DhariwalUNet"] = {k: v for k, v in UNET_ARGS["SongUNet"].items()
                             if k in inspect.signature(DhariwalUNet.__init__).parameters}


def unet_block_count(levels: int, num_blocks: int) -> int:
    """Residual blocks of a SongUNet / DhariwalUNet: per level num_blocks in the encoder and num_blocks + 1 in the
    decoder, a down and an up block between levels, two in the middle."""
    return 2 * levels * num_blocks + 3 * levels


def check_unet_arguments(model_type: str, kwargs: dict) -> None:
    """EDMArchitectureError (one line) unless every keyword of ``kwargs`` is one ``model_type`` takes, of its type
    and in its range, and the network they describe is buildable: at most MAX_UNET_BLOCKS residual blocks, a
    resolution that can be halved once per level, a resampling filter whose taps do not sum to zero."""
    if model_type not in UNETS:
        raise EDMArchitectureError(f"unknown model_type {short_repr(model_type)}; expected one of {', '.join(UNETS)}")
    rules = UNET_ARGS[model_type]
    for name, value in kwargs.items():
        if name not in rules:
            raise EDMArchitectureError(f"{model_type}: unknown keyword argument {short_repr(name)} "
                                       f"(accepted: {', '.join(sorted(rules))})")
        problem = rules[name].problem(model_type, name, value)
        if problem:
            raise EDMArchitectureError(problem)
    missing = [name for name in ("img_resolution", "in_channels", "out_channels") if name not in kwargs]
    if missing:
        raise EDMArchitectureError(f"{model_type}: missing keyword argument {missing[0]!r}")
    bound = inspect.signature(UNETS[model_type].__init__).bind_partial(None, **kwargs)
    bound.apply_defaults()
    args = bound.arguments
    resolution = int(args["img_resolution"])
    levels, blocks = len(args["channel_mult"]), unet_block_count(len(args["channel_mult"]), args["num_blocks"])
    if blocks > MAX_UNET_BLOCKS:
        raise EDMArchitectureError(f"{model_type}: {levels} levels of num_blocks={args['num_blocks']} make {blocks} "
                                   f"residual blocks, more than the {MAX_UNET_BLOCKS} this reader builds (the "
                                   "largest published EDM network has 36)")
    if resolution >> (levels - 1) < 1:
        raise EDMArchitectureError(f"{model_type}: channel_mult has {levels} levels, but img_resolution "
                                   f"{resolution} is halved to 1 pixel after {resolution.bit_length() - 1}; "
                                   f"expected at most {resolution.bit_length()} levels")
    if "resample_filter" in args and sum(args["resample_filter"]) == 0:
        raise EDMArchitectureError(f"{model_type}: resample_filter {short_repr(args['resample_filter'])} sums to 0; "
                                   "expected filter taps with a non-zero sum (the kernel is divided by it)")
