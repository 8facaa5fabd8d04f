"""Planted near-duplicates (common/edm/dataset/planted.py): the twins and the queries' float64 log-weights."""

from __future__ import annotations

import pytest
import torch

from diffmem.common.edm.dataset.edm_zip import DatasetError
from diffmem.common.edm.dataset.planted import planted_near_duplicates


@pytest.mark.parametrize("sigma,logit", [(0.002, 1.5), (0.1, -0.7)])
def test_each_query_weighs_its_twins_by_the_logit(sigma, logit):
    u, x = planted_near_duplicates(40, 5, (3, 4, 4), sigma, logit, seed=2)
    assert u.dtype == torch.uint8 and u.shape == (40, 3, 4, 4) and x.dtype == torch.float64 and x.shape == (5, 3, 4, 4)
    flat = u.reshape(40, -1).to(torch.int64)
    assert ((flat[5:10] - flat[:5]) == torch.nn.functional.one_hot(torch.zeros(5, dtype=torch.int64), 48)).all()
    y = flat.double() / 127.5 - 1
    q = x.reshape(5, -1)
    # log w_twin − log w_own = (‖x − a‖² − ‖x − b‖²) / 2σ², each squared distance summed term by term in float64.
    d_own = ((q - y[:5]) ** 2).sum(1)
    d_twin = ((q - y[5:10]) ** 2).sum(1)
    assert torch.allclose((d_own - d_twin) / (2 * sigma**2), torch.full((5,), logit, dtype=torch.float64),
                          rtol=0, atol=1e-6 if sigma < 0.01 else 1e-9)


def test_too_few_images_for_the_pairs_is_refused():
    with pytest.raises(DatasetError, match="n >= 2"):
        planted_near_duplicates(9, 5, (1, 2, 2))
