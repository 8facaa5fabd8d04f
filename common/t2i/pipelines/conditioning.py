"""What a text-to-image denoiser is conditioned on, for a batch: the token sequence, a pooled embedding and an
attention mask, whichever the family has.

Every family's conditioning is one :class:`Conditioning` whose tensors share the batch axis, so the detectors,
the sampler and the mitigations batch, repeat, slice and concatenate it without knowing the family. ``embeds`` is
the sequence the denoiser attends to (Stable Diffusion's ``encoder_hidden_states``); it is what the mitigations
perturb or optimise and what token significance differentiates. What is the same for every row (SDXL's time ids,
Flux's text ids) stays with the family.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Conditioning:
    """A batch of conditionings: embeds [N, L, D]; pooled [N, P] or None; mask [N, L] (1 = attended) or None."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def _map(self, fn, mask_fn=None) -> Conditioning:
        mask_fn = mask_fn or fn
        return Conditioning(fn(self.embeds), None if self.pooled is None else fn(self.pooled),
                            None if self.mask is None else mask_fn(self.mask))

    @property
    def shape(self) -> torch.Size:
        return self.embeds.shape

    def dim(self) -> int:
        return self.embeds.dim()

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, index) -> Conditioning:
        """Rows ``index`` (an int keeps a batch axis of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda t: t[index])

    def to(self, device=None, dtype=None) -> Conditioning:
        """On device; the float tensors in dtype (the mask keeps its own)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype), lambda m: m.to(device=device))

    def float(self) -> Conditioning:
        return self._map(lambda t: t.float(), lambda m: m)

    def detach(self) -> Conditioning:
        return self._map(lambda t: t.detach())

    def expand(self, n: int, *_) -> Conditioning:
        """A one-row conditioning broadcast to n rows (``Tensor.expand``'s extra sizes are accepted, unused)."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def repeat_interleave(self, repeats: int, dim: int = 0) -> Conditioning:
        """Each row repeated ``repeats`` times in place (prompt-major, as the latents are)."""
        if dim != 0:
            raise ValueError("a conditioning repeats along its batch axis only")
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def repeat(self, n: int, *_) -> Conditioning:
        """The whole batch repeated n times (``Tensor.repeat`` along the batch axis)."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))

    def replace(self, **changes) -> Conditioning:
        return replace(self, **changes)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The float tensors by name (embeds, pooled where present): what a gradient can be taken with respect to."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "mask" and getattr(self, f.name) is not None}


def as_conditioning(value: Conditioning | torch.Tensor) -> Conditioning:
    """A Conditioning from a conditioning or a plain [N, L, D] sequence (Stable Diffusion 1/2's whole conditioning)."""
    return value if isinstance(value, Conditioning) else Conditioning(value)


def cat_conditionings(items: list[Conditioning | torch.Tensor]) -> Conditioning:
    """The rows of several conditionings, in order (torch.cat along the batch axis of each tensor)."""
    items = [as_conditioning(c) for c in items]
    first = items[0]
    pooled = None if first.pooled is None else torch.cat([c.pooled for c in items])
    mask = None if first.mask is None else torch.cat([c.mask for c in items])
    return Conditioning(torch.cat([c.embeds for c in items]), pooled, mask)
