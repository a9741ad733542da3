"""Counter-based randomness: deterministic, key-dependent, uniform, usable under vmap/compile."""

import torch
from scipy import stats

from puregmm import keys


def test_same_inputs_same_numbers_and_keys_differ():
    a = keys.uniform(7, 3, torch.arange(1000))
    assert torch.equal(a, keys.uniform(7, 3, torch.arange(1000)))
    assert not torch.equal(a, keys.uniform(8, 3, torch.arange(1000)))
    assert not torch.equal(a, keys.uniform(7, 4, torch.arange(1000)))


def test_uniformity_kolmogorov_smirnov():
    u = keys.uniform(0, torch.arange(20000)).numpy()
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    u32 = keys.uniform(1, torch.arange(20000), dtype=torch.float32)
    assert u32.dtype == torch.float32 and float(u32.max()) < 1


def test_index_range_and_vmap_over_keys():
    idx = keys.index(3, torch.arange(5000), n=7)
    assert int(idx.min()) == 0 and int(idx.max()) == 6
    batched = torch.func.vmap(lambda k: keys.uniform(k, torch.arange(4)))(torch.arange(3))
    for k in range(3):
        assert torch.equal(batched[k], keys.uniform(k, torch.arange(4)))
    compiled = torch.compile(lambda k: keys.uniform(k, torch.arange(4)), fullgraph=True)
    assert torch.equal(compiled(torch.tensor(5)), keys.uniform(5, torch.arange(4)))
