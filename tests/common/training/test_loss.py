"""Loss math (Min-SNR, Wen et al.'s threshold mask, masked mean), per-sample seeding and the data order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.common.seeding import STREAM_NOISE, STREAM_TIMESTEP, derive_seed, randint_per_sample, randn_per_sample
from diffmem.common.training.loop import EpochBatchSampler, StepSums, epoch_permutation, micro_batches_per_epoch
from diffmem.common.training.loss import hard_threshold_keep, masked_mean, min_snr_weight, snr_from_alphas_cumprod


def test_snr_matches_diffusers_compute_snr_on_the_sd_schedule():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from diffmem.common.t2i.pipelines import SD_SCHEDULER_CONFIG

    sched = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)
    t = torch.tensor([0, 1, 250, 500, 999])
    ours = snr_from_alphas_cumprod(sched.alphas_cumprod, t)
    torch.testing.assert_close(ours, compute_snr(sched, t), rtol=1e-5, atol=0)
    # and against numpy from the betas: scaled_linear is linspace of sqrt(beta), squared
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(ours.numpy(), (abar / (1 - abar))[t.numpy()], rtol=1e-4)


def test_min_snr_weights_by_hand():
    snr = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v_prediction"),
                               torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0]))
    with pytest.raises(ValueError, match="Min-SNR"):
        min_snr_weight(snr, 5.0, "sample")


def test_hard_threshold_drops_at_or_above_the_threshold():
    norms = torch.tensor([1.9, 2.0, 2.1, 0.0])
    assert hard_threshold_keep(norms, 2.0).tolist() == [True, False, False, True]
    assert hard_threshold_keep(norms, 0.0).tolist() == [False] * 4


def test_masked_mean_by_hand_and_gradient_only_through_kept():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    keep = torch.tensor([True, False, True, False])
    loss = masked_mean(v, keep)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert v.grad.tolist() == [0.5, 0.0, 0.5, 0.0]


def test_fully_dropped_batch_is_an_exact_zero_with_a_graph_and_zero_grads():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    v = torch.stack([w[0] ** 2, w[1] ** 2 * 3])
    loss = masked_mean(v, torch.tensor([False, False]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert w.grad.tolist() == [0.0, 0.0]


def test_non_finite_dropped_loss_does_not_leak():
    v = torch.tensor([float("nan"), 1.0, float("inf")], requires_grad=True)
    loss = masked_mean(v, torch.tensor([False, True, False]))
    assert loss.item() == 1.0
    loss.backward()
    assert torch.isfinite(v.grad).all()


def test_masked_mean_across_processes_averages_to_the_global_kept_mean():
    # Two processes: rank 0 keeps 3 samples, rank 1 keeps none. DDP averages the per-process gradients.
    values = [torch.tensor([1.0, 2.0, 6.0, 5.0], requires_grad=True), torch.tensor([7.0, 8.0], requires_grad=True)]
    keeps = [torch.tensor([True, True, True, False]), torch.tensor([False, False])]
    total = sum(int(k.sum()) for k in keeps)
    per_process = [masked_mean(v, k, torch.tensor(float(total)), num_processes=2) for v, k in zip(values, keeps)]
    assert (per_process[0] + per_process[1]).item() / 2 == pytest.approx((1 + 2 + 6) / 3)
    assert per_process[1].item() == 0.0
    for loss in per_process:
        loss.backward()
    # averaged gradient = d(mean of kept)/dv = 1/3 on each kept entry
    assert (values[0].grad / 2).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])
    assert values[1].grad.tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------------------ seeding


def test_per_sample_draws_do_not_depend_on_the_batch():
    seeds = [derive_seed(0, 0, p) for p in range(5)]
    full = randn_per_sample(seeds, (4, 2, 2), STREAM_NOISE)
    alone = randn_per_sample(seeds[3:4], (4, 2, 2), STREAM_NOISE)
    assert torch.equal(full[3], alone[0])
    assert not torch.equal(full[0], full[1])
    other = randn_per_sample(seeds, (4, 2, 2), STREAM_NOISE + 1)
    assert not torch.equal(full, other)
    t = randint_per_sample(seeds, 1000, STREAM_TIMESTEP)
    assert t.dtype == torch.int64 and t.shape == (5,) and ((0 <= t) & (t < 1000)).all()
    assert torch.equal(t[2:3], randint_per_sample(seeds[2:3], 1000, STREAM_TIMESTEP))


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert len({derive_seed(0, e, p) for e in range(3) for p in range(50)}) == 150
    assert 0 <= derive_seed(7) < 2 ** 63


# ---------------------------------------------------------------------------------------- data order


def flatten(sampler):
    return [key for batch in sampler for key in batch]


def test_processes_split_each_global_batch_like_one_process_with_a_bigger_batch():
    one = flatten(EpochBatchSampler(12, 4, 1, 0, seed=3, epoch=1))
    r0 = list(EpochBatchSampler(12, 2, 2, 0, seed=3, epoch=1))
    r1 = list(EpochBatchSampler(12, 2, 2, 1, seed=3, epoch=1))
    interleaved = [k for b0, b1 in zip(r0, r1) for k in b0 + b1]
    assert interleaved == one
    assert sorted(idx for _, _, idx in one) == list(range(12))
    assert [pos for _, pos, _ in one] == list(range(12))


def test_last_batch_wraps_around_and_start_batch_skips_exactly():
    full = list(EpochBatchSampler(10, 4, 1, 0, seed=0, epoch=0))
    assert len(full) == micro_batches_per_epoch(10, 4, 1) == 3
    perm = epoch_permutation(10, 0, 0)
    assert [idx for _, _, idx in full[-1]] == [perm[8], perm[9], perm[0], perm[1]]
    tail = list(EpochBatchSampler(10, 4, 1, 0, seed=0, epoch=0, start_batch=2))
    assert tail == full[2:] and len(EpochBatchSampler(10, 4, 1, 0, 0, 0, start_batch=2)) == 1


def test_epochs_reshuffle_and_no_shuffle_is_identity():
    assert epoch_permutation(20, 0, 0) != epoch_permutation(20, 0, 1)
    assert epoch_permutation(20, 0, 0) == epoch_permutation(20, 0, 0)
    assert epoch_permutation(5, 0, 3, shuffle=False) == [0, 1, 2, 3, 4]


class _TwoEqualProcesses:
    """An accelerator stand-in whose all-reduce sums two processes holding the same values."""

    calls = 0

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        self.calls += 1
        return tensor * 2


def test_step_sums_carry_each_statistic_by_name_through_one_all_reduce():
    per_sample = torch.tensor([1.0, 2.0, 4.0])
    keep = torch.tensor([True, False, True])
    stats = {"sigma": torch.tensor([0.5, 1.0, 2.0]), "a": torch.tensor([1.0, 1.0, 1.0])}
    acc = _TwoEqualProcesses()
    one = StepSums.of_batch(per_sample, keep, stats).all_reduce(acc)
    assert acc.calls == 1
    window = (one + one).to_host()  # two micro-batches of an accumulation window
    # kept losses 1 + 4 = 5, times 2 processes, times 2 micro-batches; 2 kept and 3 seen per process and batch
    assert (window.loss, window.kept, window.seen) == (20.0, 8.0, 12.0)
    assert window.stats == {"a": 12.0, "sigma": 14.0}
    assert list(window.stats) == ["a", "sigma"]  # sorted: the logged row's order
    assert all(isinstance(v, float) for v in (window.loss, window.kept, window.seen, *window.stats.values()))
