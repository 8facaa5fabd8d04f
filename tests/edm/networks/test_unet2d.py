"""EDMNetwork on UNet2DModel: embeddings equal EDM's formulas, D(x; σ) is Table 1's, skip masks zero exactly one
skip tensor, class embeddings, and a saved network reloads with the same behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from diffmem.common.edm.networks.build import ArchConfig, build_network, count_parameters
from diffmem.common.edm.networks.unet2d import EDMNetwork, SkipMaskError, skip_channels, unet_config
from diffmem.common.edm.precond import Preconditioning

TINY = dict(resolution=8, channels=1, num_channels=8, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(4,),
            dropout=0.0)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    mask = kw.pop("skip_connections", None)
    pre = Preconditioning(kw.pop("precond", "edm"))
    return build_network(ArchConfig(**{**TINY, **kw}), pre, mask).eval()


def test_positional_embedding_is_edm_ddpmpp_formula():
    net = tiny(num_channels=4, channel_mult=(1, 1), attn_resolutions=())  # 4 noise channels: freqs 1, 1e-4
    c = torch.tensor([0.0, 1.5, -2.0, 250.0])
    got = net.unet.time_proj(c)
    want = torch.tensor([[math.sin(v), math.sin(v * 1e-4), math.cos(v), math.cos(v * 1e-4)] for v in c.tolist()])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_fourier_embedding_is_edm_ncsnpp_formula_not_diffusers():
    net = tiny(arch="ncsnpp")
    assert net.config.noise_embedding == "fourier"
    f = net.unet.time_proj.freqs.double()
    assert f.shape == (4,) and 5 < f.std() < 40  # N(0, 16²) draws
    c = torch.tensor([-0.7, 0.0, 0.9])  # EDM's ln(σ)/4 is negative for σ < 1: diffusers' "fourier" gives NaN
    x = c.double()[:, None] * 2 * math.pi * f[None, :]
    want = torch.cat([x.sin(), x.cos()], dim=1).float()
    # fp32 arguments reach |2π f c| ≈ 10², where one fp32 ulp is ~1e-5.
    torch.testing.assert_close(net.unet.time_proj(c), want, rtol=0, atol=1e-4)


def test_denoiser_is_table1_around_the_unet():
    for precond in ("vp", "ve", "edm"):
        net = tiny(precond=precond)
        x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.05, 1.0, 20.0])
        s = sigma.double().view(-1, 1, 1, 1)
        k_skip, k_out, k_in, k_noise = net.pre.coefficients(s)
        F = net.unet((k_in * x.double()).float(), k_noise.flatten().float()).sample.double()
        torch.testing.assert_close(net(x, sigma).double(), k_skip * x.double() + k_out * F, rtol=1e-5, atol=1e-5)


def decoder_inputs(net, x, sigma):
    """The input of every decoder resnet (what it receives after concatenating its skip)."""
    seen, handles = [], []
    for block in net.unet.up_blocks:
        for r in block.resnets:
            handles.append(r.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone())))
    net(x, sigma)
    for h in handles:
        h.remove()
    return seen


def test_skip_mask_entry_k_zeroes_exactly_the_kth_skip_tensor():
    full = tiny()
    cfg = full.config.unet_config
    channels = skip_channels(cfg)
    assert len(channels) == (2 + 1) * 3 == 9 and channels == [8, 8, 8, 8, 16, 16, 16, 16, 16]
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0])
    ref = decoder_inputs(full, x, sigma)
    # Reference mapping, by DiffMemorize's rule: the decoder pops skips from the end.
    consumer_of = {k: len(channels) - 1 - k for k in range(len(channels))}
    for k in range(len(channels)):
        mask = [1] * len(channels)
        mask[k] = 0
        masked = tiny(skip_connections=mask)
        masked.load_state_dict(full.state_dict())
        assert count_parameters(masked) == count_parameters(full)
        got = decoder_inputs(masked, x, sigma)
        g, c = consumer_of[k], channels[k]
        for j in range(g):  # everything the decoder computes before consuming skip k is unchanged
            torch.testing.assert_close(got[j], ref[j], rtol=0, atol=0)
        assert got[g].shape == ref[g].shape
        torch.testing.assert_close(got[g][:, :-c], ref[g][:, :-c], rtol=0, atol=0)  # the incoming hidden state
        assert torch.count_nonzero(got[g][:, -c:]) == 0 and torch.count_nonzero(ref[g][:, -c:]) > 0


def test_skip_mask_of_wrong_length_names_the_expected_length():
    with pytest.raises(SkipMaskError, match="has 8 entries; this network has 9 skip connections"):
        tiny(skip_connections=[1] * 8)
    with pytest.raises(SkipMaskError, match="0/1"):
        tiny(skip_connections=[1] * 8 + [2])


def test_saved_network_reloads_with_mask_embedding_and_preconditioning(tmp_path):
    net = tiny(arch="ncsnpp", precond="vp", skip_connections=[1, 0, 1, 1, 0, 1, 1, 1, 0])
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 5.0])
    net.save_pretrained(tmp_path / "net")
    back = EDMNetwork.from_pretrained(tmp_path / "net").eval()
    assert back.config.skip_connections == [1, 0, 1, 1, 0, 1, 1, 1, 0]
    assert back.pre.precond == "vp" and back.sigma_max == pytest.approx(net.sigma_max)
    torch.testing.assert_close(back(x, sigma), net(x, sigma), rtol=0, atol=0)
    plain = tiny(arch="ncsnpp", precond="vp")
    plain.load_state_dict(net.state_dict())
    assert not torch.allclose(plain(x, sigma), net(x, sigma))  # the reloaded mask is really in force


def test_unique_labels_get_one_embedding_row_each():
    n = 50
    cond = tiny(label_dim=n)
    uncond = tiny()
    emb_dim = cond.config.unet_config["block_out_channels"][0] * 4
    assert count_parameters(cond) - count_parameters(uncond) == n * emb_dim
    x, sigma = torch.randn(1, 1, 8, 8).expand(n, -1, -1, -1), torch.full((n,), 1.0)
    torch.nn.init.normal_(cond.unet.class_embedding.weight)
    out = cond(x, sigma, torch.arange(n))
    assert torch.unique(out.flatten(1), dim=0).shape[0] == n
    assert cond.label_dim == n and uncond.label_dim == 0


def test_unet_config_follows_edm_layout():
    cfg = unet_config(ArchConfig(resolution=32, num_channels=128, channel_mult=(2, 2, 2), num_blocks=2,
                                 attn_resolutions=(16,)))
    assert cfg["block_out_channels"] == [256, 256, 256] and cfg["layers_per_block"] == 2
    assert cfg["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    assert cfg["up_block_types"] == ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    assert cfg["norm_num_groups"] == 32 and cfg["dropout"] == 0.13
