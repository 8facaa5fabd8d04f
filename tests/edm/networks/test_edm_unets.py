"""EDM's networks (common.edm.networks.edm_unets / edm_precond) against NVlabs/edm's own forward.

Each fixture in tests/fixtures/edm_nets/<case>.safetensors holds numbers computed by NVlabs/edm's (or
DiffMemorize's) ``training/networks.py`` in a scratch folder outside the repo: the metadata gives the EDM class
name and its constructor keywords (JSON); the tensors are the state dict (``state.<key>``, random weights in
every parameter, the zero-initialised ones included), the inputs (x, sigma, class_labels, augment_labels or
emb) and EDM's fp32 output (``expected``). No EDM code is in the repo.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from safetensors import safe_open
from safetensors.torch import load_file

from diffmem.common.edm.networks.edm_preconditioners import (
    EDMNetworkError,
    EDMPrecond,
    VEPrecond,
    VPPrecond,
    build_from_edm,
    iddpm_sigma_table,
    iDDPMPrecond,
)
from diffmem.common.edm.networks.edm_unets import EDMArchitectureError, SongUNet, UNetBlock
from diffmem.common.errors import DiffmemError

FIXTURES = REPO / "tests" / "fixtures" / "edm_nets"
CASES = sorted(p.stem for p in FIXTURES.glob("*.safetensors"))
NETWORK_CASES = [c for c in CASES if not c.startswith("unetblock")]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_case(name: str):
    path = FIXTURES / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    state = {k[len("state."):]: v.float() for k, v in tensors.items() if k.startswith("state.")}
    return meta["class_name"], json.loads(meta["init_kwargs"]), state, tensors


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def built(name: str):
    class_name, kwargs, state, tensors = load_case(name)
    net = build_from_edm(class_name, kwargs)
    net.load_state_dict(state)
    return net.eval(), tensors


def test_the_fixtures_cover_every_family_and_preconditioning():
    kinds = {(load_case(c)[0], load_case(c)[1].get("model_type")) for c in NETWORK_CASES}
    assert {("VPPrecond", "SongUNet"), ("VEPrecond", "SongUNet"), ("EDMPrecond", "SongUNet"),
            ("EDMPrecond", "DhariwalUNet"), ("iDDPMPrecond", "DhariwalUNet")} <= kinds
    encoders = {load_case(c)[1].get("encoder_type") for c in NETWORK_CASES}
    assert {"standard", "skip", "residual"} <= encoders
    assert any("skip_connections" in load_case(c)[1] for c in NETWORK_CASES)
    total = sum((FIXTURES / f"{c}.safetensors").stat().st_size for c in CASES)
    assert total < 1 << 20


@pytest.mark.parametrize("name", NETWORK_CASES)
def test_forward_equals_edm(name):
    net, t = built(name)
    with torch.no_grad():
        out = net(t["x"], t["sigma"], class_labels=t.get("class_labels"), augment_labels=t.get("augment_labels"))
    assert out.dtype == torch.float32 and out.shape == t["expected"].shape
    assert relative_error(out, t["expected"]) <= 1e-5


@pytest.mark.parametrize("name", NETWORK_CASES)
def test_state_dict_keys_and_parameter_count_equal_edm(name):
    class_name, kwargs, state, _ = load_case(name)
    net = build_from_edm(class_name, kwargs)
    ours = net.state_dict()
    assert set(ours) == set(state)
    assert all(ours[k].shape == state[k].shape for k in state)
    params = {k for k, _ in net.named_parameters()}
    assert sum(state[k].numel() for k in params) == sum(p.numel() for p in net.parameters())


def test_fresh_buffers_equal_edm():
    """Buffers we compute ourselves (resampling filters, iDDPM's σ table) equal EDM's."""
    for name in NETWORK_CASES:
        class_name, kwargs, state, _ = load_case(name)
        ours = build_from_edm(class_name, kwargs).state_dict()
        for k, v in state.items():
            if k.endswith("resample_filter") or k == "u":
                torch.testing.assert_close(ours[k], v, rtol=1e-6, atol=0)


def test_multi_head_attention_block_equals_edm():
    """ADM's heads (64 channels each in full nets) on one block with 8-channel heads: q, k, v grouped per head."""
    class_name, kwargs, state, t = load_case("unetblock_adm_heads")
    assert class_name == "UNetBlock"
    init = dict(init_mode="kaiming_uniform")
    block = UNetBlock(**kwargs, init=init, init_zero=init).eval()
    assert block.num_heads == 4
    block.load_state_dict(state)
    with torch.no_grad():
        out = block(t["x"], t["emb"])
    assert relative_error(out, t["expected"]) <= 1e-5


def test_masked_skips_change_the_output_and_match_diffmemorize():
    for name in ("ddpmpp_vp_masked", "ncsnpp_ve_masked"):
        class_name, kwargs, state, t = load_case(name)
        assert 0 in kwargs["skip_connections"]
        unmasked = build_from_edm(class_name, {**kwargs, "skip_connections": [1] * len(kwargs["skip_connections"])})
        unmasked.load_state_dict(state)
        with torch.no_grad():
            out = unmasked.eval()(t["x"], t["sigma"])
        assert relative_error(out, t["expected"]) > 1e-3  # the mask matters, so the equality test is meaningful


def test_integer_labels_equal_one_hot_rows():
    net, t = built("ddpmpp_vp_cond")
    idx = t["class_labels"].argmax(1)
    with torch.no_grad():
        a = net(t["x"], t["sigma"], class_labels=idx, augment_labels=t["augment_labels"])
    assert relative_error(a, t["expected"]) <= 1e-5


def test_augment_labels_none_equals_zeros():
    net, t = built("iddpm_adm_cond")
    zeros = torch.zeros_like(t["augment_labels"])
    with torch.no_grad():
        a = net(t["x"], t["sigma"], t["class_labels"])
        b = net(t["x"], t["sigma"], t["class_labels"], augment_labels=zeros)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ncsnpp_ve", "iddpm_adm_cond", "ddpmpp_vp_masked"])
def test_save_pretrained_round_trip(name, tmp_path):
    net, t = built(name)
    net.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    back = type(net).from_pretrained(tmp_path).eval()
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(net.config)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    with torch.no_grad():
        a = net(t["x"], t["sigma"], t.get("class_labels"), t.get("augment_labels"))
        b = back(t["x"], t["sigma"], t.get("class_labels"), t.get("augment_labels"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert back.model.skip_connections == net.model.skip_connections


def test_iddpm_sigma_table_and_rounding():
    net, _ = built("iddpm_adm_cond")
    u = net.u.double()
    # The table by its recurrence in float64: u_M = 0, u_{j−1}² = (u_j² + 1)/max(ᾱ_{j−1}/ᾱ_j, C_1) − 1.
    import math
    abar = [math.sin(0.5 * math.pi * j / 1000 / 1.008) ** 2 for j in range(1001)]
    ref = [0.0] * 1001
    for j in range(1000, 0, -1):
        ref[j - 1] = math.sqrt((ref[j] ** 2 + 1) / max(abar[j - 1] / abar[j], 0.001) - 1)
    # EDM builds it in fp32, where the smallest levels lose ~1e-3 to cancellation (ᾱ_{j−1}/ᾱ_j ≈ 1).
    torch.testing.assert_close(u, torch.tensor(ref, dtype=torch.float64), rtol=1e-3, atol=1e-5)
    assert net.sigma_max == pytest.approx(ref[0], rel=1e-4) and net.sigma_min == pytest.approx(ref[999], rel=1e-3)
    # Rounding picks the nearest level; levels round to themselves; dtype and shape follow the input.
    sig = torch.tensor([[0.5, 3.0], [net.sigma_min * 1.01, 200.0]], dtype=torch.float64)
    r = net.round_sigma(sig)
    assert r.shape == sig.shape and r.dtype == torch.float64
    nearest = u[(sig.reshape(-1, 1) - u[None]).abs().argmin(1)].reshape(sig.shape)
    torch.testing.assert_close(r, nearest, rtol=1e-7, atol=0)
    torch.testing.assert_close(net.round_sigma(r), r, rtol=0, atol=0)
    idx = net.round_sigma(sig, return_index=True)
    assert idx.dtype == torch.int64 and torch.equal(net.u[idx.flatten()].double().reshape(sig.shape), r)
    # Other formulations do not round.
    vp, _ = built("ddpmpp_vp")
    assert torch.equal(vp.round_sigma(sig), sig)
    assert torch.equal(iddpm_sigma_table(1000, 0.001, 0.008), net.u)


def test_sampler_facing_properties():
    vp, _ = built("ddpmpp_vp")
    assert vp.image_shape == (3, 8, 8) and vp.label_dim == 0
    # EDM's values, computed in fp32 as EDM does (σ(1e-5) = sqrt(exp(1e-6) − 1) is 0.0009765625 in fp32, 0.001 exactly).
    assert vp.sigma_min == 0.0009765625 and vp.sigma_max == pytest.approx(152.16697692871094, rel=1e-7)
    ve, _ = built("ncsnpp_ve")
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)
    cond, _ = built("ddpmpp_vp_cond")
    assert cond.label_dim == 10


def test_unknown_class_or_keyword_is_one_line_naming_it():
    _, kwargs, _, _ = load_case("ddpmpp_vp")
    with pytest.raises(EDMNetworkError) as e:
        build_from_edm("StyleGAN2Generator", kwargs)
    assert "StyleGAN2Generator" in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, DiffmemError)
    with pytest.raises(EDMNetworkError) as e:
        build_from_edm("VPPrecond", {**kwargs, "fancy_option": 3})
    assert "fancy_option" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(EDMNetworkError) as e:
        build_from_edm("VPPrecond", {**kwargs, "model_type": "UNet3D"})
    assert "UNet3D" in str(e.value)
    with pytest.raises(EDMArchitectureError) as e:
        build_from_edm("VPPrecond", {**kwargs, "skip_connections": [1, 1]})
    assert "skip_connections has 2 entries" in str(e.value) and isinstance(e.value, DiffmemError)
    with pytest.raises(EDMArchitectureError):
        build_from_edm("VPPrecond", {**kwargs, "encoder_type": "fancy"})


def test_edm_call_convention_and_defaults():
    """EDM's own way to construct: keywords straight to the preconditioner; the config keeps them."""
    net = VPPrecond(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1, 1], num_blocks=1,
                    attn_resolutions=[4], dropout=0.0)
    assert net.config.model_type == "SongUNet" and net.config.model_kwargs["model_channels"] == 8
    assert isinstance(EDMPrecond(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1,
                                 attn_resolutions=[]).model, torch.nn.Module)
    assert iDDPMPrecond(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1,
                        attn_resolutions=[]).model.out_conv.out_channels == 2
    ve = VEPrecond(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1,
                   attn_resolutions=[], skip_connections=[1, 0])
    assert ve.model.skip_connections == [1, 0]


def test_snapshot_folders_of_edm_networks_load_with_load_network(tmp_path):
    from diffmem.common.edm.networks.snapshot import load_network, save_snapshot

    net, t = built("ncsnpp_ve_masked")
    save_snapshot(net, tmp_path, 1000, {"step": 1})
    back = load_network(tmp_path)
    assert type(back) is VEPrecond and not back.training
    with torch.no_grad():
        torch.testing.assert_close(back(t["x"], t["sigma"]), net(t["x"], t["sigma"]), rtol=0, atol=0)


def test_sampler_uses_the_networks_sigma_rounding():
    """EDM's sampler rounds its σ steps (and t̂) with net.round_sigma: for iDDPM every σ D sees is a table level."""
    from diffmem.common.edm.sampler import SamplerSettings, sample_batch

    net, _ = built("iddpm_adm_cond")
    seen = []

    class Recorder:
        sigma_min, sigma_max, label_dim, image_shape = net.sigma_min, net.sigma_max, net.label_dim, net.image_shape
        round_sigma = staticmethod(net.round_sigma)

        def __call__(self, x, sigma, labels=None):
            seen.append(torch.as_tensor(sigma).reshape(-1).double())
            return net(x, sigma, labels)

    x, labels = sample_batch(Recorder(), [0, 1], SamplerSettings(num_steps=4, S_churn=2.0))
    assert torch.isfinite(x).all() and labels.shape == (2,)
    table = net.u.double()
    for s in torch.cat(seen):
        assert (table - s).abs().min() == 0


# ------------------------------------------------------------------ the block's in-place arithmetic


def reference_block(block: UNetBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The block's function as the paper writes it, every step out of place (no in-place SiLU, dropout or sum),
    attention as an explicit softmax(qᵀk/√c) v: what the optimised forward must equal."""
    orig = x
    x = block.conv0(F.silu(block.norm0(x)))
    params = block.affine(emb)[:, :, None, None]
    if block.adaptive_scale:
        scale, shift = params.chunk(2, dim=1)
        x = F.silu(shift + block.norm1(x) * (scale + 1))
    else:
        x = F.silu(block.norm1(x + params))
    x = block.conv1(F.dropout(x, p=block.dropout, training=block.training))
    x = (x + (block.skip(orig) if block.skip is not None else orig)) * block.skip_scale
    if block.num_heads:
        n, c, h, w = x.shape
        heads = block.num_heads
        q, k, v = block.qkv(block.norm2(x)).reshape(n * heads, c // heads, 3, h * w).unbind(2)
        weights = torch.softmax(q.transpose(1, 2) @ k / (c // heads) ** 0.5, dim=2)  # [n·heads, hw_q, hw_k]
        a = (v @ weights.transpose(1, 2)).reshape(n, c, h, w)
        x = (block.proj(a) + x) * block.skip_scale
    return x


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("adaptive_scale,heads,down", [(False, 1, False), (True, 2, False), (False, 1, True)])
def test_block_in_place_dropout_and_silu_equal_the_out_of_place_computation(adaptive_scale, heads, down):
    """Training (dropout in place on the SiLU's output, same seed, same masks) and no-grad evaluation (SiLU in
    place): output, input gradient and every parameter gradient within 1e-6 relative of ``reference_block``."""
    torch.manual_seed(0)
    init = dict(init_mode="xavier_uniform")
    block = UNetBlock(8, 16, 12, down=down, attention=not down, num_heads=heads, dropout=0.3,
                      skip_scale=0.5 ** 0.5, eps=1e-6, adaptive_scale=adaptive_scale, resample_proj=True,
                      init=init, init_zero=init)
    x, emb = torch.randn(3, 8, 8, 8), torch.randn(3, 12)
    results = []
    for forward in (block, lambda x, emb: reference_block(block, x, emb)):
        block.train().zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        out = forward(xi, emb)
        out.square().sum().backward()
        results.append([out.detach(), xi.grad, *(p.grad for p in block.parameters())])
    assert len(results[0]) == 2 + len(list(block.parameters()))
    for ours, ref in zip(*results):
        assert _relative(ours, ref) <= 1e-6
    block.eval()
    with torch.no_grad():
        assert _relative(block(x, emb), reference_block(block, x, emb)) <= 1e-6


def test_song_unet_no_grad_forward_equals_the_recorded_one():
    """SongUNet's in-place SiLUs without autograd (the sampler's case) give the recorded forward's output."""
    torch.manual_seed(0)
    net = SongUNet(8, 3, 3, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                   dropout=0.1, embedding_type="fourier", encoder_type="residual", resample_filter=[1, 3, 3, 1]).eval()
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2)
    with torch.no_grad():
        fast = net(x, c)
    recorded = net(x.requires_grad_(), c)
    assert _relative(fast, recorded.detach()) <= 1e-6
