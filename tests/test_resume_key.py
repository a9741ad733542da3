"""Issue 14 item 5: the key is part of a fit's identity; resuming under another key is refused."""

import pytest
import torch

import puregmm as pg

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # max_steps is hit on purpose


@pytest.mark.parametrize("method", ["em", "gd"])
def test_resume_with_another_key_raises(tmp_path, method):
    x = torch.randn(60, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ckpt = tmp_path / "c.safetensors"
    pg.fit(x, 2, "diagonal", method=method, max_steps=3, key=0, checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"different fit.*keys: checkpoint \[0\] vs now \[5\]"):
        pg.fit(x, 2, "diagonal", method=method, max_steps=6, key=5, resume=ckpt)


def test_resume_with_the_same_key_continues_bit_exactly(tmp_path):
    x = torch.randn(60, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ckpt = tmp_path / "c.safetensors"
    whole = pg.fit(x, 2, "full", method="em", max_steps=6, tol=1e-300, key=3)
    pg.fit(x, 2, "full", method="em", max_steps=3, tol=1e-300, key=3, checkpoint=ckpt)
    resumed = pg.fit(x, 2, "full", method="em", max_steps=6, tol=1e-300, key=3, resume=ckpt)
    assert torch.equal(resumed.params.means, whole.params.means)
    assert resumed.n_steps == whole.n_steps == 6
