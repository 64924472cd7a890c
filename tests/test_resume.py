"""Exact resume when the run draws from an accelerator's generator (MAE's masks on a GPU), not only the CPU's.

On a GPU, MAE draws its masks from the device's default generator.  A resumed run reseeds every generator
(``torch.manual_seed``), so unless the resume file holds the device generator's state, the resumed run draws
step 0's masks again.  Without a GPU the tests stand a second CPU generator in for the device's: it draws the
masks, ``torch.manual_seed`` seeds it (as it seeds every CUDA device), and the loop's device-generator hook
gets and sets it.  The real CUDA branch is checked with ``torch.cuda``'s state functions faked, and for real
when a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from adaptsoup.core.data import ImageSet, Preprocess
from adaptsoup.ssl.mae import MaskedAutoencoder
from adaptsoup.train import loop
from adaptsoup.train.losses import mae_loss
from adaptsoup.train.loop import TrainConfig, load_train_state, save_train_state, train
from tests.helpers import tiny_model

STEPS, CRASH_AT = 5, 3


class Crash(Exception):
    pass


def _data(n: int = 16) -> ImageSet:
    gen = torch.Generator().manual_seed(0)
    return ImageSet(images=torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), paths=[str(i) for i in range(n)])


def _mae_run(tmp_path, device: str, crash: bool, masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """MAE for STEPS steps on ``device`` (cut off at step CRASH_AT and resumed if ``crash``); the masks drawn
    at each step are appended to ``masks``; returns the final state (on the CPU)."""
    cfg = TrainConfig(steps=STEPS, lr=1e-3, batch_size=8, augment="crop-flip", precision="fp32", device=device,
                      checkpoint_every_s=0.0 if crash else 1e9)
    state = tmp_path / f"{device}-{crash}.pt"

    def stop(step: int, loss: float) -> None:
        if crash and step == CRASH_AT and not state.with_suffix(".resumed").exists():
            state.with_suffix(".resumed").touch()
            raise Crash()

    def run() -> MaskedAutoencoder:
        encoder = tiny_model()
        mae = MaskedAutoencoder(encoder)
        train(mae, mae_loss, _data(), Preprocess.for_model(encoder), cfg, state_path=state, on_step=stop)
        return mae

    if crash:
        with pytest.raises(Crash):
            run()
        assert torch.load(state, weights_only=True)["step"] == CRASH_AT
        del masks[CRASH_AT:]  # the step that was cut off is done again
    model = run()
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@pytest.fixture
def recorded_masks(monkeypatch):
    """Every mask MAE draws, in order."""
    masks: list[torch.Tensor] = []
    original = MaskedAutoencoder.random_masking

    def recording(self, num_patches, batch, device, generator=None):
        out = original(self, num_patches, batch, device, generator)
        masks.append(out[1].detach().cpu())
        return out

    monkeypatch.setattr(MaskedAutoencoder, "random_masking", recording)
    return masks


@pytest.fixture
def device_generator(monkeypatch, recorded_masks):
    """A CPU generator standing for the accelerator's: MAE's masks come from it, ``torch.manual_seed`` seeds it,
    and the loop saves and restores it as the run device's generator."""
    fake = torch.Generator()
    seed_all = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda seed: (fake.manual_seed(int(seed)), seed_all(seed))[1])
    recording = MaskedAutoencoder.random_masking
    monkeypatch.setattr(MaskedAutoencoder, "random_masking",
                        lambda self, num_patches, batch, device, generator=None: recording(self, num_patches, batch, device, fake))
    monkeypatch.setattr(loop, "_device_rng", lambda device: (fake.get_state, fake.set_state), raising=False)
    return fake


def test_a_run_resumed_mid_way_draws_the_masks_and_ends_where_an_uninterrupted_one_does(tmp_path, device_generator, recorded_masks):
    uninterrupted = _mae_run(tmp_path, "cpu", crash=False, masks=recorded_masks)
    want_masks = list(recorded_masks)
    recorded_masks.clear()
    resumed = _mae_run(tmp_path, "cpu", crash=True, masks=recorded_masks)
    assert len(want_masks) == len(recorded_masks) == STEPS
    # the bug: the resumed steps drew step 0's and 1's masks again
    assert all(torch.equal(a, b) for a, b in zip(want_masks, recorded_masks))
    assert not torch.equal(want_masks[0], want_masks[CRASH_AT])  # (so the check above can tell them apart)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def _fake_cuda(monkeypatch) -> dict[int, torch.Tensor]:
    """``torch.cuda``'s generator-state functions over a generator per device index, without a GPU."""
    generators = {i: torch.Generator().manual_seed(100 + i) for i in range(2)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": generators[device].get_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": generators[device].set_state(state))
    return generators


def test_the_run_devices_cuda_generator_goes_into_the_resume_file_and_back_onto_the_resuming_device(tmp_path, monkeypatch):
    generators = _fake_cuda(monkeypatch)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generators[1].manual_seed(7)
    torch.rand(5, generator=generators[1])  # rank 1's draws so far
    saved = generators[1].get_state()
    path = tmp_path / "state.pt"
    save_train_state(path, 3, model, optimizer, [1.0], 2.0, "fp32", torch.device("cuda", 1))
    file = torch.load(path, weights_only=True)
    assert file["rng_device"]["type"] == "cuda" and torch.equal(file["rng_device"]["state"], saved)

    # resumed on device 0 (another world size), its generator freshly seeded as a new process's would be
    assert not torch.equal(generators[0].get_state(), saved)
    step, *_ = load_train_state(path, tiny_model(), torch.optim.AdamW(tiny_model().parameters(), lr=1e-3), torch.device("cuda", 0))
    assert step == 3 and torch.equal(generators[0].get_state(), saved)
    reference = torch.Generator()
    reference.set_state(saved)
    assert torch.equal(torch.rand(4, generator=generators[0]), torch.rand(4, generator=reference))  # the draws continue where rank 1's stopped


def test_a_cpu_resume_file_leaves_the_accelerator_generator_alone(tmp_path, monkeypatch):
    generators = _fake_cuda(monkeypatch)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_train_state(tmp_path / "state.pt", 2, model, optimizer, [], 1.0, "fp32", torch.device("cpu"))
    assert "rng_device" not in torch.load(tmp_path / "state.pt", weights_only=True)
    before = generators[0].get_state()
    load_train_state(tmp_path / "state.pt", model, optimizer, torch.device("cuda", 0))
    assert torch.equal(generators[0].get_state(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the device path itself is tested above with fakes)")
def test_on_a_gpu_a_resumed_mae_run_draws_the_uninterrupted_runs_masks(tmp_path, recorded_masks):
    uninterrupted = _mae_run(tmp_path, "cuda", crash=False, masks=recorded_masks)
    want_masks = list(recorded_masks)
    recorded_masks.clear()
    resumed = _mae_run(tmp_path, "cuda", crash=True, masks=recorded_masks)
    assert len(want_masks) == len(recorded_masks) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(want_masks, recorded_masks))
    # weights: equal up to the GPU's non-deterministic reductions (gather's backward adds atomically)
    assert max(float((uninterrupted[k].float() - resumed[k].float()).abs().max()) for k in uninterrupted) < 1e-4
