"""FOA, forward-only adaptation of an ONNX export (adaptsoup/tta/foa.py, adaptsoup/deploy/prompted.py): the
prompt-capable graph against PyTorch and against the plain export, the fitness and activation shift against
the official code's formulas (mr-eggplant/FOA tta_library/foa.py, models/vpt.py), CMA-ES lowering the fitness,
and ``tta --onnx ... --method foa`` end to end on fp32 and int8 files.

Tolerances: the fp32 graph against PyTorch within 1e-5 (logits and features; float32 summation order), the
int8 graph against fp32 by top-1 agreement and 0.5 in the logits (dynamic quantization of a 3-class head scaled
by 20); everything computed from the graph's own outputs within 1e-6."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.models import model_meta
from adaptsoup.deploy.onnx import export_onnx
from adaptsoup.deploy.predict import predict_folder
from adaptsoup.deploy.prompted import OUTPUTS, PromptedSession, PromptedViT, export_prompted, freeze_prompts, prompted_shape
from adaptsoup.errors import AdaptsoupError
from adaptsoup.tta.foa import FOA, FOAConfig, fitness, softmax_entropy, source_statistics
from adaptsoup_cli.main import main

from helpers import CLASS_NAMES, random_batch, tiny_model, write_noise_images

WIDTH = 32  # vit_pico_patch4_32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny model, its prompt-capable export (fp32 and dynamic int8) and its plain export."""
    model = tiny_model(seed=3)
    root = tmp_path_factory.mktemp("foa")
    report = export_prompted(model, root / "model.prompted.onnx", int8=True, log=lambda _: None)
    plain = export_onnx(model, root / "model.onnx", log=lambda _: None).path
    ckpt = save_checkpoint(root / "model.safetensors", model.state_dict(), model_meta(model))
    return model, report, plain, ckpt


def official_prompted(model, x, prompts):
    """The official PromptViT (models/vpt.py), transcribed: prompts after the class token, before norm_pre;
    the class token of block i normalised by block i+1's norm1, the last by the final norm; the head on the
    final sequence's class token."""
    vit = model
    with torch.no_grad():
        t = vit._pos_embed(vit.patch_embed(x))
        t = torch.cat([t[:, :1], prompts.unsqueeze(0).expand(len(x), -1, -1), t[:, 1:]], dim=1)
        t = vit.norm_pre(t)
        layers = []
        for i, block in enumerate(vit.blocks):
            t = block(t)
            layers.append(vit.blocks[i + 1].norm1(t[:, 0]) if i + 1 < len(vit.blocks) else vit.norm(t[:, 0]))
        return vit.head(vit.norm(t)[:, 0]), torch.stack(layers, dim=1)


def torch_forward(model):
    """The FOA forward of :class:`PromptedViT` in PyTorch (fast and exactly reproducible)."""
    prompted = PromptedViT(model).eval()

    def forward(x, prompts, shift):
        p = torch.zeros(0, WIDTH) if prompts is None else torch.as_tensor(np.asarray(prompts, np.float32))
        s = torch.zeros(WIDTH) if shift is None else torch.as_tensor(np.asarray(shift, np.float32))
        with torch.no_grad():
            return dict(zip(OUTPUTS, (t.numpy() for t in prompted(torch.as_tensor(x), p, s))))

    return forward


@pytest.mark.parametrize("count", [1, 3])
def test_prompted_graph_matches_pytorch_with_the_same_prompts(exported, count):
    model, report, _, _ = exported
    session = PromptedSession(report.path)
    x = random_batch(5, seed=count)
    prompts = torch.randn(count, WIDTH, generator=torch.Generator().manual_seed(count))
    out = session.run(x.numpy(), prompts.numpy(), None)
    logits, layers = official_prompted(model, x, prompts)
    np.testing.assert_allclose(out["logits"], logits.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["logits_unshifted"], out["logits"], atol=0, rtol=0)
    np.testing.assert_allclose(out["layer_features"], layers.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["features"], layers[:, -1].numpy(), atol=1e-5, rtol=0)
    assert report.max_abs_diff < 1e-4 and session.shape == prompted_shape(model)


def test_prompted_graph_without_prompts_is_the_plain_export(exported):
    model, report, plain, _ = exported
    x = random_batch(6, seed=7).numpy()
    got = PromptedSession(report.path).run(x, None, None)["logits"]
    want = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=0)


def test_int8_prompted_graph_follows_fp32(exported):
    _, report, _, _ = exported
    x = random_batch(8, seed=4).numpy()
    prompts = np.random.default_rng(0).normal(size=(3, WIDTH)).astype(np.float32)
    fp32 = PromptedSession(report.path).run(x, prompts, None)["logits"]
    int8 = PromptedSession(report.int8_path).run(x, prompts, None)["logits"]
    assert np.abs(int8 - fp32).max() < 0.5 and (int8.argmax(1) == fp32.argmax(1)).all()


def test_frozen_prompts_give_a_plain_model_with_the_same_outputs(exported, tmp_path):
    _, report, _, _ = exported
    x = random_batch(4, seed=9).numpy()
    rng = np.random.default_rng(1)
    prompts, shift = rng.normal(size=(2, WIDTH)).astype(np.float32), rng.normal(size=WIDTH).astype(np.float32)
    frozen = freeze_prompts(report.path, tmp_path / "adapted.onnx", prompts, shift)
    session = ort.InferenceSession(str(frozen), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["logits"]
    np.testing.assert_allclose(session.run(None, {"input": x})[0], PromptedSession(report.path).run(x, prompts, shift)["logits"],
                               atol=1e-6, rtol=0)


def test_fitness_is_the_official_formula():
    """foa.py forward_and_get_loss: entropy summed over the batch + lambda (sum of squared std and mean gaps to
    the source, torch.std_mean's unbiased std) x B / 64."""
    rng = np.random.default_rng(0)
    layers, logits = rng.normal(size=(10, 2, WIDTH)), rng.normal(size=(10, 3)) * 3
    source = source_statistics(lambda x, p, s: {"layer_features": x}, [rng.normal(size=(40, 2, WIDTH)) + 0.5])
    got = fitness({"layer_features": layers, "logits_unshifted": logits}, source, 0.4)
    feats = torch.from_numpy(layers.reshape(10, -1))
    std, mean = torch.std_mean(feats, dim=0)
    train_std, train_mean = (torch.from_numpy(v.reshape(-1)) for v in (source.std, source.mean))
    discrepancy = 0.4 * (((std - train_std) ** 2).sum() + ((mean - train_mean) ** 2).sum()) * 10 / 64
    z = torch.from_numpy(logits)
    entropy = -(z.softmax(1) * z.log_softmax(1)).sum()
    assert got.value == pytest.approx(float(entropy + discrepancy), rel=1e-9)
    assert got.entropy == pytest.approx(float(entropy), rel=1e-9) and got.discrepancy == pytest.approx(float(discrepancy), rel=1e-9)
    assert softmax_entropy(np.array([[1000.0, 1000.0]]))[0] == pytest.approx(math.log(2))  # stable for large logits


def test_cma_es_lowers_the_fitness_over_a_few_batches():
    """A constructed shift: the source is standard-normal inputs, the target 0.4 x + 1.  Over 8 target batches
    the best prompts lower the fitness of a held-out target batch (the same seeds give the same numbers)."""
    model = tiny_model(seed=3)
    forward = torch_forward(model)
    source = source_statistics(forward, [random_batch(32, seed=s).numpy() for s in (1, 2)])
    held = (0.4 * random_batch(32, seed=99) + 1.0).numpy()

    def run():
        foa = FOA(forward, prompted_shape(model), source, FOAConfig(popsize=8))
        scores = [fitness(forward(held, foa.prompts(), None), source, 0.4).value]
        for i in range(8):
            foa.step((0.4 * random_batch(16, seed=10 + i) + 1.0).numpy())
            scores.append(fitness(forward(held, foa.prompts(), None), source, 0.4).value)
        return scores, foa

    scores, foa = run()
    unprompted = fitness(forward(held, None, None), source, 0.4).value
    assert scores[-1] < 0.93 * min(scores[0], unprompted)
    assert all(s.forward_passes == 9 for s in foa.steps)  # popsize + the previous best
    assert run()[0] == scores  # seeded: CMA-ES 2020, the initial prompts, PyTorch on one thread


@pytest.mark.parametrize("count", [0, 2])
def test_activation_shift_is_the_hand_computed_one(exported, count):
    """Batch 2 is predicted as head(features + gamma (mu_source - m)), m the mean over batch 1's candidates of
    their feature means (official _update_hist, _get_shift_vector, forward_and_get_loss)."""
    model, report, _, _ = exported
    session, calls = PromptedSession(report.path), []

    def recording(x, prompts, shift):
        out = session.run(x, prompts, shift)
        calls.append((prompts, shift, out))
        return out

    source = source_statistics(session.run, [random_batch(16, seed=1).numpy()])
    foa = FOA(recording, session.shape, source, FOAConfig(num_prompts=count, popsize=4, shift_step=0.7))
    first, second = random_batch(8, seed=2).numpy(), random_batch(8, seed=3).numpy()
    foa.step(first)
    assert all(shift is None for _, shift, _ in calls)  # no shift before any batch
    hist = np.mean([out["features"].astype(np.float64).mean(0) for _, _, out in calls], axis=0)
    shift = 0.7 * (source.mean[-1] - hist)
    calls.clear()
    got = foa.step(second)
    assert len(calls) == (5 if count else 1)
    best = foa.steps[-1].best_candidate or 0
    prompts = calls[best][0]
    np.testing.assert_allclose(calls[best][1], shift, atol=1e-12, rtol=0)
    features = session.run(second, prompts, None)["features"].astype(np.float64)
    weight, bias = (t.detach().double().numpy() for t in (model.head.weight, model.head.bias))
    np.testing.assert_allclose(got, (features + shift) @ weight.T + bias, atol=1e-5, rtol=0)
    np.testing.assert_allclose(foa.hist, 0.9 * hist + 0.1 * np.mean([o["features"].astype(np.float64).mean(0) for *_, o in calls], 0),
                               atol=1e-12, rtol=0)


def cli(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return (info.value.code or 0), captured.out, captured.err


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("foa-data")
    for i, name in enumerate(CLASS_NAMES):
        write_noise_images(root / "stream" / name, 4, seed=20 + i)
    write_noise_images(root / "source", 10, seed=40)
    return root


@pytest.mark.parametrize("int8", [False, True])
def test_tta_onnx_foa_end_to_end(exported, folders, tmp_path, capsys, int8):
    _, report, _, _ = exported
    onnx_path = report.int8_path if int8 else report.path
    code, out, err = cli(capsys, "tta", "--onnx", onnx_path, "--method", "foa", "--eval-labels", folders / "stream",
                         "--source", folders / "source", "--out", tmp_path / "out", "--batch-size", "5", "--popsize", "6",
                         "--threads", "1", "--no-progress")
    assert code == 0, err
    assert "online accuracy" in out and "forward passes" in err
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv", encoding="utf-8")))
    assert len(rows) == 12 and {r["class"] for r in rows} <= set(CLASS_NAMES)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    result = manifest["result"]
    assert result["method"] == "foa" and result["batches"] == 3 and result["forward_passes"] == 3 * 7
    assert np.asarray(result["prompts"]).shape == (3, WIDTH) and len(result["shift"]) == WIDTH
    assert result["source_images"] == 10 and set(result["timings_s"]) >= {"adaptation", "source_statistics", "total"}
    assert manifest["config"]["popsize"] == 6 and manifest["config"]["fitness_lambda"] == 0.4
    frozen = ort.InferenceSession(str(tmp_path / "out" / "adapted.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in frozen.get_inputs()] == ["input"]
    assert predict_folder(tmp_path / "out" / "adapted.onnx", folders / "source", tmp_path / "p.csv", threads=1).images == 10


def test_tta_model_and_onnx_exports_then_adapts_the_int8_copy(exported, folders, tmp_path, capsys):
    _, _, _, ckpt = exported
    code, _, err = cli(capsys, "tta", "--model", ckpt, "--onnx", tmp_path / "soup.onnx", "--int8", "--method", "foa",
                       "--target", folders / "source", "--prompts", "0", "--out", tmp_path / "out", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "soup.onnx").is_file() and (tmp_path / "soup.int8.onnx").is_file()
    result = json.loads((tmp_path / "out" / "manifest.json").read_text())["result"]
    assert result["onnx"].endswith("soup.int8.onnx") and result["forward_passes_per_batch"] == 1
    assert "without source statistics" in result["variant"] and result["shift"] is None


def test_tta_onnx_bad_input_is_one_line_and_exit_2(exported, folders, tmp_path, capsys):
    _, _, plain, ckpt = exported
    common = ["--target", folders / "source", "--out", tmp_path / "out", "--no-progress"]
    cases = {
        "not an ONNX": (["--onnx", ckpt, "--method", "foa"], "cannot load ONNX model"),
        "plain graph": (["--onnx", plain, "--method", "foa"], "not a prompt-capable export"),
        "gradient method": (["--onnx", plain, "--method", "sar"], "--method foa"),
        "unknown method": (["--onnx", plain, "--method", "nope"], "--method foa"),
        "no onnx": (["--model", ckpt, "--method", "foa"], "give --onnx"),
        "missing file": (["--onnx", tmp_path / "absent.onnx", "--method", "foa"], "not found"),
        "int8 without model": (["--onnx", plain, "--method", "foa", "--int8"], "--int8"),
    }
    for name, (args, message) in cases.items():
        code, _, err = cli(capsys, "tta", *args, *common)
        assert code == 2, name
        assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("adaptsoup: error:"), (name, err)
    with pytest.raises(AdaptsoupError, match="not a prompt-capable export"):
        PromptedSession(plain)
