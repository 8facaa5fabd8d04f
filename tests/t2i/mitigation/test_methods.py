"""Every inference-time mitigation against a step-by-step computation of its rule on the tiny pipeline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from broken_calibrations import write_broken_calibration
from mitigation_case import PROMPTS, ROWS, STEPS, G, W, method_settings

from diffmem.common.t2i.detection import encode_prompts
from diffmem.common.t2i.text_noise import initial_latents

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


_settings = method_settings


def _inputs(parts, prompts=PROMPTS, rows=ROWS):
    emb = encode_prompts(parts, prompts).embeds.embeds
    uncond = parts.unconditional().embeds
    lat = initial_latents(rows, G, parts.latent_shape, 11, init_noise_sigma=float(parts.scheduler.init_noise_sigma))
    return emb, uncond, lat


def _generate(parts, method, prompts=PROMPTS, rows=ROWS, steps=STEPS, **kw):
    from diffmem.common.t2i.mitigation.methods import generate_batch

    emb, uncond, lat = _inputs(parts, prompts, rows)
    return generate_batch(parts, emb, uncond, lat, rows, prompts, _settings(method, steps, **kw))


def _scheduler(parts, steps=STEPS):
    s = parts.scheduler.__class__.from_config(parts.scheduler.config)
    s.set_timesteps(steps)
    return s


def _eps(parts, x, t, cond, uncond):
    """(ε_u, ε_c) for trajectories x [N, ...] with per-trajectory conditions cond [N, L, D], written out."""
    with torch.no_grad():
        e_u = parts.unet(x, t, encoder_hidden_states=uncond.expand(x.shape[0], -1, -1)).sample
        e_c = parts.unet(x, t, encoder_hidden_states=cond).sample
    return e_u, e_c


def hand_sample(parts, cond, uncond, x, scale_fn, observe=None, steps=STEPS):
    """DDIM written out trajectory by trajectory; scale_fn(step, t, n, ‖ε_c − ε_u‖) gives trajectory n's scale."""
    out = []
    for n in range(x.shape[0]):
        s = _scheduler(parts, steps)
        xn = x[n:n + 1].clone()
        for step, t in enumerate(s.timesteps):
            e_u, e_c = _eps(parts, xn, t, cond[n:n + 1], uncond)
            w = scale_fn(step, int(t), n, float((e_c - e_u).flatten().norm()))
            prev = xn
            xn = s.step(e_u + w * (e_c - e_u), t, xn).prev_sample
            if observe is not None:
                observe(n, step, prev, xn)
        out.append(xn[0])
    return torch.stack(out)


def _flat_cond(emb):
    return emb.repeat_interleave(G, dim=0)


def _close(a, b):
    torch.testing.assert_close(a.flatten(0, 1) if a.dim() == 5 else a, b, rtol=1e-4, atol=1e-4)


# --- Jain et al.: guidance schedules ---------------------------------------------------------------------------

def test_jain_transition_step_on_hand_made_norms():
    from diffmem.common.t2i.mitigation.guidance_schedule import DynamicTransition, jain_transition_step

    norms = torch.tensor([[5.0, 4.0, 3.0, 3.5, 2.0],   # first rise at step 3 (after the minimum at step 2)
                          [1.0, 2.0, 1.0, 0.5, 0.4],   # rises at once: step 1
                          [4.0, 3.0, 3.0, 2.0, 1.0]])  # never rises (equal is not a rise): S
    assert jain_transition_step(norms).tolist() == [3, 1, 5]
    rule = DynamicTransition(early_scale=1.0, guidance_scale=W)
    scales = torch.stack([rule(i, 0.0, norms[:, i]) for i in range(5)], dim=1)
    assert rule.transition_step.tolist() == [3, 1, -1]
    assert scales.tolist() == [[1, 1, 1, W, W], [1, W, W, W, W], [1, 1, 1, 1, 1]]
    # their script's rule: the rise must follow a fall (a minimum strictly inside the sequence)
    norms = torch.cat([norms, torch.tensor([[1.0, 2.0, 1.0, 1.5, 0.4]])])
    assert jain_transition_step(norms, "minimum").tolist() == [3, 5, 5, 3]
    assert jain_transition_step(norms, "rise").tolist() == [3, 1, 5, 1]
    rule = DynamicTransition(early_scale=1.0, guidance_scale=W, rule="minimum")
    for i in range(5):
        rule(i, 0.0, norms[:, i])
    assert rule.transition_step.tolist() == [3, -1, -1, 3]


def test_jain_og_transition_and_static_scale_by_hand():
    from diffmem.common.t2i.mitigation.guidance_schedule import (
        jain_og_transition,
        jain_static_scale,
        latent_step_distance,
    )

    d = torch.tensor([[0.9, 0.5, 0.6, 0.4, 0.7, 0.8],   # minima at 1 and 3: the first is step 1, so 3
                      [0.9, 0.8, 0.3, 0.5, 0.6, 0.7],   # minimum at 2
                      [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])  # none: step 5
    assert jain_og_transition(d).tolist() == [3, 2, 5]
    assert jain_og_transition(d[:, :3]).tolist() == [1, 3, 3]  # fallback clipped to S
    assert jain_static_scale(501, 500, 0.0, W) == 0.0 and jain_static_scale(500, 500, 0.0, W) == W
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert latent_step_distance(a, b).item() == pytest.approx(1 - 1 / math.sqrt(2))


def test_jain_stp_step_by_step(tiny_parts):
    emb, uncond, lat = _inputs(tiny_parts)
    tau, early = 500.0, -2.0
    got = _generate(tiny_parts, "jain_stp", jain_tau=tau, jain_early_scale=early)
    want = hand_sample(tiny_parts, _flat_cond(emb), uncond, lat.flatten(0, 1),
                       lambda step, t, n, d: early if t > tau else W)
    _close(got.latents, want)
    assert got.extra_unet_calls == [[0] * G] * 2
    # the default early scale is their τ = 500 setting's 0
    assert _settings("jain_stp").fingerprint()["jain_early_scale"] == 0.0


class StepScaledUNet(torch.nn.Module):
    """The tiny UNet with its output multiplied by a factor per timestep: a random model's ‖ε_c − ε_u‖ only falls
    along a trajectory, this one rises where the factor does (so the dynamic transition happens mid-trajectory)."""

    def __init__(self, unet, factors: dict):
        super().__init__()
        self.unet, self.factors, self.config = unet, factors, unet.config

    def forward(self, x, t, encoder_hidden_states=None, return_dict=True):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        out = self.unet(x, t, encoder_hidden_states=encoder_hidden_states).sample * self.factors.get(int(t), 1.0)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def test_jain_dtp_step_by_step(tiny_parts):
    from dataclasses import replace

    parts = replace(tiny_parts, unet=StepScaledUNet(tiny_parts.unet, {334: 2.0, 1: 3.5}))
    emb, uncond, lat = _inputs(parts)
    state: dict = {}

    def rule(step, t, n, d):
        prev = state.get(n)
        if prev is not None and not state.get(("on", n)) and d > prev:
            state[("on", n)] = step
        state[n] = d
        return W if state.get(("on", n)) is not None else 1.0

    got = _generate(parts, "jain_dtp")
    want = hand_sample(parts, _flat_cond(emb), uncond, lat.flatten(0, 1), rule)
    _close(got.latents, want)
    steps = [s for r in got.details for s in r["transition_step"]]
    assert steps == [state.get(("on", n)) for n in range(2 * G)]
    assert set(steps) & {1, 2}  # the transition happens inside the trajectory
    assert got.extra_unet_calls == [[0] * G] * 2


def test_jain_og_step_by_step(tiny_parts):
    from diffmem.common.t2i.mitigation.guidance_schedule import jain_og_transition

    emb, uncond, lat = _inputs(tiny_parts)
    steps = 6  # the tiny model's cosine distances have an interior minimum (step 3) with 6 steps
    dist = torch.zeros(2 * G, steps, dtype=torch.float64)

    def observe(n, step, prev, nxt):
        dist[n, step] = 1 - torch.nn.functional.cosine_similarity(nxt.flatten().double(), prev.flatten().double(),
                                                                    dim=0)

    hand_sample(tiny_parts, _flat_cond(emb), uncond, lat.flatten(0, 1), lambda *a: -W, observe, steps)
    switch = jain_og_transition(dist)
    assert (switch < steps).all()
    want = hand_sample(tiny_parts, _flat_cond(emb), uncond, lat.flatten(0, 1),
                       lambda step, t, n, d: W if step >= switch[n] else -W, steps=steps)
    got = _generate(tiny_parts, "jain_og", steps=steps)
    _close(got.latents, want)
    assert [s for r in got.details for s in r["transition_step"]] == switch.tolist()
    assert got.extra_unet_calls == [[2 * steps] * G] * 2


# --- Han et al.: initial noise ----------------------------------------------------------------------------------

def test_han_batch_update_against_direct_evaluation(tiny_parts):
    from diffmem.common.t2i.mitigation.init_noise import han_batch_adjust

    emb, uncond, lat = _inputs(tiny_parts)
    cond, x = _flat_cond(emb), lat.flatten(0, 1)
    T = _scheduler(tiny_parts).timesteps[0]
    rho, gamma, M = 5.0, 0.7, 2
    want = x.clone()
    for _ in range(M):
        for n in range(x.shape[0]):
            xn = want[n:n + 1]
            e_u, e_c = _eps(tiny_parts, xn, T, cond[n:n + 1], uncond)
            e = e_c - e_u
            e_u2, e_c2 = _eps(tiny_parts, xn + rho * e / e.flatten().norm(), T, cond[n:n + 1], uncond)
            want[n] = (xn - gamma * ((e_c2 - e_u2) - e))[0]
    got = han_batch_adjust(tiny_parts, cond, uncond.expand(x.shape[0], -1, -1), x, num_inference_steps=STEPS,
                           rho=rho, gamma=gamma, steps=M)
    _close(got, want)
    assert not torch.allclose(got, x)
    # then ε_u alone while t > τ, CFG after, from the adjusted x_T
    tau = 500.0
    full = _generate(tiny_parts, "han_batch", han_rho=rho, han_gamma=gamma, han_m=M, han_tau=tau)
    _close(full.latents, hand_sample(tiny_parts, cond, uncond, want, lambda step, t, n, d: 0.0 if t > tau else W))
    assert full.extra_unet_calls == [[4 * M] * G] * 2


def hand_han_sample(parts, cond, uncond, x, lr, target, iters):
    """Their per-sample loop for one trajectory: check, stop or step AdamW (torch defaults but lr)."""
    T = _scheduler(parts).timesteps[0]
    p = x.clone().requires_grad_(True)
    opt = torch.optim.AdamW([p], lr=lr)
    losses = []
    for _ in range(iters):
        e_u = parts.unet(p, T, encoder_hidden_states=uncond).sample
        e_c = parts.unet(p, T, encoder_hidden_states=cond).sample
        loss = (e_c - e_u).flatten().norm()
        losses.append(loss.item())
        if loss.item() <= target:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return p.detach(), losses


def test_han_sample_batched_equals_one_by_one_and_their_loop(tiny_parts):
    from diffmem.common.t2i.mitigation.init_noise import guidance_direction, han_sample_loss, han_sample_optimise

    emb, uncond, lat = _inputs(tiny_parts)
    cond, x = _flat_cond(emb), lat.flatten(0, 1)
    N = x.shape[0]
    sched = _scheduler(tiny_parts)
    with torch.no_grad():
        start = han_sample_loss(guidance_direction(tiny_parts, sched, x, sched.timesteps[0], cond,
                                                   uncond.expand(N, -1, -1)))
    target = float(start.sort().values[1]) * 0.97  # one trajectory is done at once, the others need updates
    kw = dict(num_inference_steps=STEPS, lr=0.05, target_loss=target, iters=6)
    batched = han_sample_optimise(tiny_parts, cond, uncond.expand(N, -1, -1), x, **kw)
    assert len(set(batched.iterations)) > 1 and min(batched.iterations) == 0
    for n in range(N):
        alone = han_sample_optimise(tiny_parts, cond[n:n + 1], uncond, x[n:n + 1], **kw)
        assert alone.iterations == [batched.iterations[n]]
        torch.testing.assert_close(alone.latents[0], batched.latents[n], rtol=1e-3, atol=1e-3)
        hand, losses = hand_han_sample(tiny_parts, cond[n:n + 1], uncond, x[n:n + 1], 0.05, target, 6)
        assert alone.evaluations == [len(losses)]
        assert alone.initial_loss[0] == pytest.approx(losses[0], rel=1e-4)
        assert alone.final_loss[0] == pytest.approx(losses[-1], rel=1e-4)
        torch.testing.assert_close(alone.latents, hand, rtol=1e-3, atol=1e-3)
    # CFG from step 0 from the optimised x_T
    full = _generate(tiny_parts, "han_sample", han_lr=0.05, han_target_loss=target, han_iters=6)
    _close(full.latents, hand_sample(tiny_parts, cond, uncond, batched.latents, lambda *a: W))
    evals = [e for r in full.details for e in r["han_iterations"]]
    assert evals == batched.iterations
    assert [e for r in full.extra_unet_calls for e in r] == [2 * e for e in batched.evaluations]


# --- Ren et al.: attention --------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", [None, 1, 5])
def test_ren_processor_against_explicit_softmax(tiny_pipe, tiny_parts, heads):
    """The tiny UNet's own cross-attention (8 heads, as SD 1.x), and stand-alone ones with 1 and 5 heads (SD 2.x
    has 5, 10 and 20 heads of 64 channels), against the masked, rescaled softmax written out per head."""
    from diffusers.models.attention_processor import Attention

    from diffmem.common.t2i.mitigation.attention_rescale import RenAttnProcessor, ren_key_mask

    attn = tiny_parts.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    if heads is not None:
        torch.manual_seed(1)
        attn = Attention(query_dim=attn.query_dim, cross_attention_dim=attn.cross_attention_dim, heads=heads,
                         dim_head=6).eval()
    torch.manual_seed(0)
    hidden = torch.randn(4, 10, attn.query_dim)
    enc = torch.randn(4, 77, attn.cross_attention_dim)
    keep = ren_key_mask(tiny_parts.tokenizer, ["a cat", "a dog on a mat"]).repeat(2, 1)  # [u0, u1, c0, c1]
    assert keep[0].tolist()[:5] == [True, True, True, True, False]  # BOS, a, cat, first EOS | padding
    C = 1.3
    bos = torch.tensor([1.0, 1.0, C, C])
    with torch.no_grad():
        got = RenAttnProcessor(keep, bos)(attn, hidden, enc)
        h, d = attn.heads, attn.inner_dim // attn.heads
        q = attn.to_q(hidden).double().view(4, 10, h, d)
        k = attn.to_k(enc).double().view(4, 77, h, d)
        v = attn.to_v(enc).double().view(4, 77, h, d)
        want = torch.zeros(4, 10, h, d, dtype=torch.float64)
        for b in range(4):
            for j in range(h):
                s = q[b, :, j] @ k[b, :, j].T / math.sqrt(d)  # [10, 77]
                s[:, 0] = s[:, 0] * bos[b]
                s[:, ~keep[b]] = -math.inf
                want[b, :, j] = torch.softmax(s, dim=-1) @ v[b, :, j]
        want = attn.to_out[0](want.reshape(4, 10, h * d).float())
        # with no change to the logits the written-out softmax is diffusers' own attention
        plain = RenAttnProcessor(torch.ones(4, 77, dtype=torch.bool), torch.ones(4))(attn, hidden, enc)
        torch.testing.assert_close(plain, attn(hidden, encoder_hidden_states=enc), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_ren_attn_generation_uses_the_processor_and_restores(tiny_parts):
    from diffmem.common.t2i.mitigation.attention_rescale import ren_attention, ren_batch_rows, ren_key_mask

    before = {k: type(v) for k, v in tiny_parts.unet.attn_processors.items()}
    got = _generate(tiny_parts, "ren_attn", ren_c=1.25)
    assert {k: type(v) for k, v in tiny_parts.unet.attn_processors.items()} == before
    emb, uncond, lat = _inputs(tiny_parts)
    keep, scale = ren_batch_rows(ren_key_mask(tiny_parts.tokenizer, PROMPTS), G, 1.25)
    assert scale.tolist() == [1.0] * 4 + [1.25] * 4
    from diffmem.common.t2i.sampler import sample_latents

    with ren_attention(tiny_parts.unet, keep, scale):
        want = sample_latents(tiny_parts, emb, uncond, lat, num_inference_steps=STEPS, guidance_scale=W)
    torch.testing.assert_close(got.latents, want, rtol=0, atol=0)
    none = _generate(tiny_parts, "none")
    assert not torch.allclose(got.latents, none.latents)


# --- GNI and the shared rules ----------------------------------------------------------------------------------

def test_gni_zero_is_none_and_noise_is_per_row(tiny_parts):
    from diffmem.common.t2i.mitigation.embedding_noise import gni_noise

    none = _generate(tiny_parts, "none")
    zero = _generate(tiny_parts, "gni", gni_scale=0.0)
    torch.testing.assert_close(zero.latents, none.latents, rtol=0, atol=0)
    noisy = _generate(tiny_parts, "gni", gni_scale=0.5)
    assert not torch.allclose(noisy.latents, none.latents)
    both = gni_noise(ROWS, G, (77, 32), 11)
    assert torch.equal(gni_noise(ROWS[1:], G, (77, 32), 11)[0], both[1])  # batch-independent
    alone = _generate(tiny_parts, "gni", prompts=PROMPTS[1:], rows=ROWS[1:], gni_scale=0.5)
    torch.testing.assert_close(alone.latents[0], noisy.latents[1], rtol=1e-4, atol=1e-4)


def test_every_method_starts_from_the_same_noise(tiny_parts, monkeypatch, tmp_path):
    import diffmem.common.t2i.mitigation.guard as guard
    import diffmem.common.t2i.mitigation.guidance_schedule as guidance_schedule
    import diffmem.common.t2i.mitigation.init_noise as init_noise
    import diffmem.common.t2i.mitigation.methods as methods
    import diffmem.common.t2i.mitigation.prss as prss
    import diffmem.common.t2i.mitigation.stability_region as stability_region
    from diffmem.common.t2i.mitigation.methods import METHODS
    from diffmem.common.t2i.mitigation.run import condition_batch

    seen: dict = {}
    real = {"sample": methods.sample_latents, "batch": init_noise.han_batch_adjust,
            "per_sample": init_noise.han_sample_optimise, "guard": guard.guard_sample, "prss": prss.prss_sample}

    def spy(kind):
        def f(parts, cond, uncond, latents, *a, **kw):
            seen.setdefault(method, latents.detach().clone().reshape(-1, *latents.shape[-3:]))
            return real[kind](parts, cond, uncond, latents, *a, **kw)
        return f

    monkeypatch.setattr(methods, "sample_latents", spy("sample"))
    monkeypatch.setattr(guidance_schedule, "sample_latents", spy("sample"))  # jain_og's opposite-guidance pass
    monkeypatch.setattr(init_noise, "han_batch_adjust", spy("batch"))
    monkeypatch.setattr(init_noise, "han_sample_optimise", spy("per_sample"))
    monkeypatch.setattr(guard, "guard_sample", spy("guard"))  # the methods with a sampling loop of their own
    monkeypatch.setattr(prss, "prss_sample", spy("prss"))
    monkeypatch.setattr(stability_region, "sample_latents", spy("sample"))  # broken samples through its monitor
    from diffmem.common.t2i.mitigation.methods import generate_batch

    uncond = encode_prompts(tiny_parts, [""]).embeds.embeds
    expected = initial_latents(ROWS, G, tiny_parts.latent_shape, 11).flatten(0, 1)
    for method in METHODS:
        s = _settings(method, optim_iters=1, repeat_num=1, han_iters=1, han_m=1)
        if method == "broken":
            s.broken_calibration = write_broken_calibration(tiny_parts, tmp_path / "cal.json", STEPS, W)
        cond = condition_batch(tiny_parts, uncond, PROMPTS, ROWS, s)
        generate_batch(tiny_parts, cond["embeds"], uncond, cond["latents"], ROWS, cond["prompts_used"], s)
        assert torch.equal(seen[method], expected), method


def test_top3_is_membench_top3():
    from diffmem.common.similarity import top_k_mean

    assert top_k_mean(torch.tensor([0.1, 0.9, 0.4, 0.7])) == pytest.approx((0.9 + 0.7 + 0.4) / 3)
    assert top_k_mean(torch.tensor([0.2, 0.6])) == pytest.approx(0.4)


# --- settings: binding, resume, bad values ---------------------------------------------------------------------

def test_binding_settings_per_method(tmp_path):
    from diffmem.common.errors import ConfigError
    from diffmem.common.t2i.mitigation.run import MitigationFiles

    files = MitigationFiles(tmp_path / "run")
    fp = _settings("jain_stp", jain_tau=400.0).fingerprint()
    assert fp["jain_tau"] == 400.0 and fp["jain_early_scale"] == 0.0
    assert not {"han_rho", "ren_c", "gni_scale", "optim_iters", "repeat_num"} & fp.keys()
    files.prepare(fp)
    files.results.write_text('{"row": 0}\n')
    # the paper default written out is the same run; other methods' settings cannot block it
    assert files.prepare(_settings("jain_stp", jain_tau=400.0, jain_early_scale=0.0, han_rho=3.0).fingerprint())
    with pytest.raises(ConfigError, match="jain_tau=400.0 \\(now 650.0\\)"):
        files.prepare(_settings("jain_stp", jain_tau=650.0).fingerprint())
    assert _settings("jain_dtp").fingerprint()["jain_early_scale"] == 1.0
    assert _settings("han_sample").fingerprint()["han_target_loss"] == 0.9
    assert _settings("ren_attn").fingerprint()["ren_c"] == 1.25
    assert _settings("gni").fingerprint()["gni_scale"] == 0.1


@pytest.mark.parametrize("extra, expected", [
    (["--method", "jain_stp", "--jain_tau", "-1"], "--jain_tau must be a timestep >= 0, got -1.0"),
    (["--method", "ren_attn", "--ren_c", "0"], "--ren_c must be a finite number > 0, got 0.0"),
    (["--method", "gni", "--gni_scale", "-0.1"], "--gni_scale must be a finite number >= 0, got -0.1"),
    (["--method", "han_batch", "--han_gamma", "-0.7"], "--han_gamma must be a finite number > 0"),
    (["--method", "han_sample", "--han_iters", "-1"], "--han_iters must be >= 0"),
    (["--method", "han_batch", "--han_tau", "nan"], "argument --han_tau: expected a finite number, got 'nan'"),
    (["--method", "jain_dtp", "--jain_dtp_rule", "fall"], "argument --jain_dtp_rule: invalid choice: 'fall'"),
    # a norm never gets below 0: such a target would silently run every update
    (["--method", "ours", "--optim_target_loss", "-1"], "--optim_target_loss must be > 0, got -1: the loss is a norm"),
    (["--method", "ours", "--optim_target_loss", "0"], "--optim_target_loss must be > 0, got 0: the loss is a norm"),
])
def test_bad_settings_one_line_exit_2(tmp_path, capsys, extra, expected):
    from diffmem.mitigate.inference_mem import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"caption": "a cat"}) + "\n")
    try:
        rc = main(["--model_id", str(tmp_path / "no-model"), "--dataset", str(prompts), "--run_name", "x",
                   "--sscd_model", "none", "--skip_clip", "--out", str(tmp_path / "x"), *extra])
    except SystemExit as exc:  # argparse's own checks (choices, types) exit while parsing
        rc = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "x").exists()


def test_inference_mem_new_method_resumes_and_binds(tmp_path, tiny_pipeline_dir, capsys):
    from diffmem.mitigate.inference_mem import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"caption": p}) + "\n" for p in PROMPTS))
    args = ["--model_id", str(tiny_pipeline_dir), "--dataset", str(prompts), "--run_name", "r", "--method",
            "jain_dtp", "--num_inference_steps", "2", "--num_images_per_prompt", "1", "--sscd_model", "none",
            "--skip_clip", "--out", str(tmp_path / "r"), "--batch_size", "1"]
    assert main([*args, "--end", "1"]) == 0
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 now, 1 resumed" in out
    rows = [json.loads(line) for line in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1]
    for r in rows:
        assert r["method"] == "jain_dtp" and r["extra_unet_calls"] == [0] and r["seconds_per_image"] > 0
        assert len(r["transition_step"]) == 1
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["method"] == "jain_dtp" and config["jain_early_scale"] == 1.0
    assert main([*args, "--jain_early_scale", "0.5"]) == 2
    assert "jain_early_scale=1.0 (now 0.5)" in capsys.readouterr().err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["cost"]["extra_unet_calls_per_image"] == 0


def test_ours_with_prompts_already_at_the_target_says_so(tmp_path, tiny_pipeline_dir, capsys):
    """Wen et al. stop at the target, so a prompt whose loss is already below it gets no update: legitimate, but
    said once in the output and counted in summary.json, never a silent unmitigated run."""
    from diffmem.mitigate.inference_mem import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"caption": p}) + "\n" for p in PROMPTS))
    args = ["--model_id", str(tiny_pipeline_dir), "--dataset", str(prompts), "--run_name", "r", "--method", "ours",
            "--num_inference_steps", "2", "--num_images_per_prompt", "1", "--sscd_model", "none", "--skip_clip",
            "--batch_size", "2"]
    assert main([*args, "--out", str(tmp_path / "high"), "--optim_target_loss", "1e6"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    n = len(PROMPTS)
    assert warnings == [f"warning: {tmp_path / 'high'}: --method ours made no update for {n} of {n} prompts: their "
                        f"loss was already <= --optim_target_loss 1e+06 (Wen et al. stop at the target), so their "
                        f"images are unmitigated; a lower target moves them (summary.json loss.prompts_not_updated)"]
    summary = json.loads((tmp_path / "high" / "summary.json").read_text())
    assert summary["loss"]["prompts_not_updated"] == n and summary["loss"]["iterations_mean"] == 0
    # A target below every loss: every prompt is updated, and nothing is said.
    assert main([*args, "--out", str(tmp_path / "low"), "--optim_target_loss", "1e-6", "--optim_iters", "1"]) == 0
    assert "warning:" not in capsys.readouterr().err
    summary = json.loads((tmp_path / "low" / "summary.json").read_text())
    assert summary["loss"]["prompts_not_updated"] == 0 and summary["loss"]["iterations_mean"] == 1


# --- the trade-off harness -------------------------------------------------------------------------------------

def test_plan_runs_and_sweeps():
    from diffmem.common.errors import ConfigError
    from diffmem.common.t2i.mitigation.tradeoff import parse_sweeps, plan_runs

    knobs = {"optim_target_loss": [1.0, 2.0], "repeat_num": [4], **parse_sweeps(["jain_tau=300,700", "ren_c=1.1"])}
    runs = plan_runs(_settings("none"), ["none", "ours", "jain_stp", "jain_dtp", "jain_og", "ren_attn", "gni",
                                         "rand_word_add"], knobs)
    assert [r.label for r in runs] == ["none", "ours_target1", "ours_target2", "jain_stp_tau300",
                                            "jain_stp_tau700", "jain_dtp_early_scale1", "jain_og", "ren_attn_c1.1",
                                            "gni_scale0.1", "rand_word_add_repeat4"]
    assert [r.settings.jain_tau for r in runs if r.label.startswith("jain_stp")] == [300.0, 700.0]
    assert [r.settings.method for r in runs] == ["none", "ours", "ours", "jain_stp", "jain_stp", "jain_dtp", "jain_og",
                                           "ren_attn", "gni", "rand_word_add"]
    assert {r.series for r in runs if r.settings.method == "ours"} == {"ours"}
    # an item with its own settings: Jain et al.'s two static settings and Wen's loss with and without Chen's mask
    runs = plan_runs(_settings("none"), ["jain_stp", "jain_stp:jain_tau=650,jain_early_scale=-2", "ours",
                                         "ours:be_mask=1"],
                     {"optim_target_loss": [3.0], **parse_sweeps(["jain_tau=500"])})
    assert [(r.label, r.series) for r in runs] == [
        ("jain_stp_tau500", "jain_stp"), ("jain_stp_tau650_early_scale-2", "jain_stp_tau650_early_scale-2"),
        ("ours_target3", "ours"), ("ours_mask1_target3", "ours_mask1")]
    stp, og = runs[0].settings, runs[1].settings
    assert (stp.jain_tau, stp.jain_early("jain_stp")) == (500.0, 0.0)
    assert (og.jain_tau, og.jain_early("jain_stp"), og.be_mask) == (650.0, -2.0, False)
    assert runs[3].settings.be_mask is True and runs[2].settings.be_mask is False
    for bad, message in [("jain_stp:han_rho=3", "FIELD one of jain_tau, jain_early_scale"),
                         ("jain_stp:jain_tau=x", "jain_tau expects a number"), ("ours:be_mask=2", "expects 0 or 1"),
                         ("jain_og:jain_tau=3", "jain_og has no settings"), ("nope", "unknown method 'nope'"),
                         ("gni:", "no FIELD=VALUE")]:
        with pytest.raises(ConfigError, match=message):
            plan_runs(_settings("none"), [bad], {})
    with pytest.raises(ConfigError, match="expected KNOB=V1,V2"):
        parse_sweeps(["han_rho=1,2"])
    with pytest.raises(ConfigError, match="must be numbers"):
        parse_sweeps(["ren_c=1.1,x"])


@pytest.fixture(scope="module")
def small_lab(tmp_path_factory):
    """Two captions with a ground-truth image each, a COCO-format general set and a stand-in SSCD model."""
    from PIL import Image
    from sscd_standins import TinyDescriptor

    d = tmp_path_factory.mktemp("small-lab")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"caption": p, "index": i}) + "\n"
                                             for i, p in enumerate(PROMPTS)))
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        (d / "gt_images" / str(i)).mkdir(parents=True)
        pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(d / "gt_images" / str(i) / "a.png")
    (d / "coco.csv").write_text(";Caption;URL;Index\n0;a person standing close to an elephant;;0000\n"
                                "1;sheep eating grass in the snow;;0001\n2;a red bus;;0002\n")
    torch.jit.script(TinyDescriptor()).save(str(d / "sscd.pt"))
    return d


def test_tradeoff_methods_sweep_general_and_resume(tmp_path, tiny_pipeline_dir, small_lab, capsys):
    from diffmem.mitigate.tradeoff import main

    args = ["--model_id", str(tiny_pipeline_dir), "--dataset", str(small_lab / "prompts.jsonl"), "--run_name", "t",
            "--out", str(tmp_path / "t"), "--num_images_per_prompt", "1", "--num_inference_steps", "2",
            "--methods", "none", "jain_stp", "jain_stp:jain_tau=650,jain_early_scale=-2", "han_batch", "gni",
            "--sweep", "jain_tau=300,700",
            "--general_dataset", str(small_lab / "coco.csv"), "--general_end", "2",
            "--sscd_model", str(small_lab / "sscd.pt"), "--reference_model", "ViT-S-32",
            "--reference_model_pretrain", "none", "--batch_size", "2"]
    assert main(args) == 0, capsys.readouterr().err
    out = json.loads((tmp_path / "t" / "tradeoff.json").read_text())
    points = {p["label"]: p for p in out["points"]}
    assert list(points) == ["none", "jain_stp_tau300", "jain_stp_tau700", "jain_stp_tau650_early_scale-2",
                            "han_batch_tau900", "gni_scale0.1"]
    assert [p["series"] for p in points.values()] == ["none", "jain_stp", "jain_stp", "jain_stp_tau650_early_scale-2",
                                                      "han_batch", "gni"]
    assert out["general_prompts"] == 2 and out["prompts"] == 2
    for p in points.values():
        for key in ("sscd_mean", "membench_sscd", "membench_top3_sscd", "membench_rate_gt_0.5", "clip_score_mean",
                    "general_clip_score_mean", "seconds_per_image"):
            assert p[key] is not None, (p["label"], key)
        assert p["general_prompts"] == 2
    assert points["han_batch_tau900"]["extra_unet_calls_per_image"] == 8
    assert points["none"]["extra_unet_calls_per_image"] == 0
    # with one generation, MemBench's max and top-3 are that generation's SSCD
    assert points["none"]["membench_sscd"] == pytest.approx(points["none"]["sscd_mean"])
    general_rows = (tmp_path / "t" / "gni_scale0.1" / "general" / "results.jsonl").read_text().splitlines()
    assert len(general_rows) == 2 and all("sscd" not in json.loads(r) for r in general_rows)
    assert (tmp_path / "t" / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same command resumes every run; a changed setting of a swept run is refused
    capsys.readouterr()
    assert main(args) == 0
    again = json.loads((tmp_path / "t" / "tradeoff.json").read_text())["points"]
    assert [p["sscd_mean"] for p in again] == [p["sscd_mean"] for p in out["points"]]
    assert main([*args, "--han_rho", "10"]) == 2
    assert "han_rho=50.0 (now 10.0)" in capsys.readouterr().err


def test_tradeoff_bad_sweep_one_line_exit_2(tmp_path, small_lab, capsys):
    from diffmem.mitigate.tradeoff import main

    rc = main(["--model_id", str(tmp_path / "none"), "--dataset", str(small_lab / "prompts.jsonl"), "--run_name",
               "t", "--out", str(tmp_path / "t"), "--methods", "ren_attn", "--sweep", "ren_c=1.1,-1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and err == ["tradeoff: error: --ren_c must be a finite number > 0, got -1.0"]
    assert not (tmp_path / "t").exists()


def test_random_clip_weights_are_the_same_in_every_load():
    from diffmem.common.similarity import load_clip_scorer

    a = load_clip_scorer("ViT-S-32", "none")
    b = load_clip_scorer("ViT-S-32", "none")
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name


# --- Chen et al.: the bright-ending mask on Wen et al.'s loss ------------------------------------------------------

def test_be_mask_by_hand():
    from diffmem.common.t2i.mitigation.bright_ending import be_mask

    coarse = torch.tensor([[1.0, 3.0, 2.0, 2.0]])  # a 2×2 map
    fine = torch.tensor([[4.0] * 16])  # a 4×4 map
    m = be_mask([coarse, fine], (4, 4))
    want = (torch.nn.functional.interpolate(coarse.view(1, 1, 2, 2), size=(4, 4), mode="bilinear",
                                            align_corners=False) + 4.0) / 2
    torch.testing.assert_close(m, want / want.max())
    assert m.max() == 1.0


def test_end_token_recorder_against_explicit_softmax(tiny_parts):
    from diffmem.common.t2i.mitigation.attention_rescale import RenAttnProcessor
    from diffmem.common.t2i.mitigation.bright_ending import EndTokenAttentionRecorder, end_token_positions

    attn = tiny_parts.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    eos = end_token_positions(tiny_parts.tokenizer, ["a cat", "a dog on a mat"])
    assert eos.tolist() == [3, 6]
    torch.manual_seed(1)
    hidden, enc = torch.randn(2, 9, attn.query_dim), torch.randn(2, 77, attn.cross_attention_dim)
    rec = EndTokenAttentionRecorder(eos)
    with torch.no_grad():
        out = rec(attn, hidden, enc)
        plain = RenAttnProcessor(torch.ones(2, 77, dtype=torch.bool), torch.ones(2))(attn, hidden, enc)
        h, d = attn.heads, attn.inner_dim // attn.heads
        q = attn.to_q(hidden).double().view(2, 9, h, d).transpose(1, 2)
        k = attn.to_k(enc).double().view(2, 77, h, d).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [2, h, 9, 77]
    want = torch.stack([probs[b, :, :, eos[b]].mean(dim=0) for b in range(2)]).float()
    torch.testing.assert_close(rec.maps[0], want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # attention itself is unchanged


def test_ours_with_be_mask_optimises_the_masked_loss(tiny_parts):
    from diffmem.common.t2i.detection import text_noise_objective
    from diffmem.common.t2i.mitigation.bright_ending import bright_ending_masks
    from diffmem.common.t2i.mitigation.run import condition_batch

    emb, uncond, lat = _inputs(tiny_parts)
    masks = bright_ending_masks(tiny_parts, emb, uncond, lat, PROMPTS, num_inference_steps=STEPS, guidance_scale=W)
    assert masks.shape == (2, G, 1, 8, 8) and masks.amax(dim=(2, 3, 4)).allclose(torch.ones(2, G))
    # the masked objective is the norm of the masked difference, written out
    T = _scheduler(tiny_parts).timesteps[0]
    got = text_noise_objective(tiny_parts, emb, uncond, lat, num_inference_steps=STEPS, target_steps=[0],
                               guidance_scale=W, mask=masks)
    e_u, e_c = _eps(tiny_parts, lat.flatten(0, 1), T, _flat_cond(emb), uncond)
    want = ((e_c - e_u) * masks.flatten(0, 1)).flatten(1).norm(dim=1).view(2, G)
    torch.testing.assert_close(got[..., 0].detach(), want, rtol=1e-4, atol=1e-6)
    s = _settings("ours", be_mask=True, optim_target_loss=None, optim_iters=2)
    cond = condition_batch(tiny_parts, uncond, PROMPTS, ROWS, s)
    assert cond["loss_initial"] == pytest.approx(want.mean(dim=1).tolist(), rel=1e-4)
    assert cond["extra_unet_calls"] == [2 * STEPS + 2 * 3] * 2  # the unmitigated generation + 3 loss evaluations
    assert s.fingerprint()["be_mask"] is True and "be_mask" not in _settings("ours").fingerprint()
