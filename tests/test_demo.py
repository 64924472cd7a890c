"""The demo prints the same numbers wherever it runs: it fixes torch's thread count, on which CPU sums depend."""

from __future__ import annotations

import pytest
import torch

from adaptsoup.core.models import load_model


class Stop(Exception):
    pass


def test_the_demo_pins_its_torch_threads(monkeypatch, tmp_path):
    import adaptsoup_bench.demo as demo

    def stop(*args, **kwargs):
        raise Stop  # the thread count is set; the run itself is not needed

    monkeypatch.setattr(demo, "make_digits_folders", stop)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with pytest.raises(Stop):
            demo.main(["--workdir", str(tmp_path), "--no-progress"])
        assert torch.get_num_threads() == demo.DEMO_THREADS == 2
        with pytest.raises(Stop):
            demo.main(["--workdir", str(tmp_path), "--no-progress", "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _gradient(threads: int) -> torch.Tensor:
    from adaptsoup_bench.demo import DEMO_MODEL

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = load_model(None, DEMO_MODEL).train()
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    finally:
        torch.set_num_threads(before)


def test_gradients_repeat_exactly_at_a_fixed_thread_count():
    """Why the count is pinned: at one count a step repeats bit for bit (across counts it need not)."""
    assert torch.equal(_gradient(2), _gradient(2))
