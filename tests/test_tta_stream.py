"""The fair-stream TTA benchmark (benchmarks/tta_stream*.py) on tiny random ViTs and random images: the three
settings' stream orders, resets and pre-update logits, the soup without TTA, the scores, the choice of the learning
rates and its frozen use on the report split, the split guards, and the report."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.data import Preprocess
from adaptsoup.core.models import model_meta
from adaptsoup.tta.adapter import Adapter, TTAConfig
from adaptsoup_bench import tta_stream
from adaptsoup_bench.render_reports import render_reports, renderer
from adaptsoup_bench.tta_stream_data import correct_of, plain_logits, run_stream, score, stream_segments
from helpers import tiny_model

K, N = 3, 10  # corruptions, images per corruption


def random_images(k: int = K, n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, size=(k, n, 3, 32, 32), dtype=np.uint8))


def tent(seed: int = 0, lr: float = 0.5, **kw) -> TTAConfig:
    return TTAConfig(method="tent", batch_size=4, base_lr=lr, seed=seed, **kw)


# -- stream orders ----------------------------------------------------------------------------------------------------


def test_reset_and_continual_show_each_corruption_as_a_block_in_the_fixed_order():
    reset = stream_segments("reset", K, N, seed=1)
    assert len(reset) == K
    for k, segment in enumerate(reset):
        assert (segment[:, 0] == k).all() and sorted(segment[:, 1]) == list(range(N))
    assert not all((s[:, 1] == np.arange(N)).all() for s in reset)  # shuffled within the corruption
    (continual,) = stream_segments("continual", K, N, seed=1)
    assert continual[:, 0].tolist() == [k for k in range(K) for _ in range(N)]
    assert np.array_equal(continual, np.concatenate(reset))  # the same order within each block, no reset between


def test_the_mixed_stream_is_a_seeded_permutation_of_every_pair():
    (mixed,) = stream_segments("mixed", K, N, seed=1)
    assert sorted(map(tuple, mixed.tolist())) == [(k, n) for k in range(K) for n in range(N)]
    assert np.array_equal(mixed, stream_segments("mixed", K, N, seed=1)[0])
    assert not np.array_equal(mixed, stream_segments("mixed", K, N, seed=2)[0])
    assert len(set(mixed[: N, 0].tolist())) > 1  # not in blocks
    with pytest.raises(Exception, match="unknown setting"):
        stream_segments("episodic", K, N, 0)


# -- one online pass ----------------------------------------------------------------------------------------------------


class Spy:
    """An Adapter that logs its resets and batches, and the model's own logits just before each update."""

    def __init__(self, model, cfg):
        self.inner = Adapter(model, cfg)
        self.events, self.before = [], []

    def reset(self):
        self.events.append("reset")
        self.inner.reset()

    def predict_and_adapt(self, x):
        with torch.no_grad():
            self.before.append(self.inner.model(x).clone())
        self.events.append("batch")
        return self.inner.predict_and_adapt(x)

    @property
    def records(self):
        return self.inner.records


def test_the_reset_setting_starts_every_corruption_from_the_soup():
    soup, images = tiny_model(seed=1), random_images()
    pre = Preprocess.for_model(soup)
    segments = stream_segments("reset", K, N, seed=0)
    spies = []

    def make():
        spies.append(Spy(copy.deepcopy(soup), tent()))
        return spies[-1]

    done = run_stream(make, images, segments, pre, 3, batch_size=4)
    per_corruption = ["batch"] * 3  # 10 images in batches of 4
    assert spies[0].events == per_corruption + ["reset"] + per_corruption + ["reset"] + per_corruption
    assert done.stream_resets == K - 1 and done.batches == 9
    for k, segment in enumerate(segments):  # each corruption as its own fresh pass
        alone = run_stream(lambda: Adapter(copy.deepcopy(soup), tent()), images[k : k + 1], [np.c_[np.zeros(N, int), segment[:, 1]]], pre, 3, 4)
        torch.testing.assert_close(done.logits[k], alone.logits[0])
    continual = run_stream(lambda: Adapter(copy.deepcopy(soup), tent()), images, stream_segments("continual", K, N, 0), pre, 3, 4)
    torch.testing.assert_close(continual.logits[0], done.logits[0])  # the first block is the same pass
    assert not torch.allclose(continual.logits[1:], done.logits[1:])  # then continual carries its adaptation on
    assert continual.stream_resets == 0


def test_the_logits_recorded_are_made_before_each_update():
    soup, images = tiny_model(seed=2), random_images()
    pre = Preprocess.for_model(soup)
    (segment,) = stream_segments("mixed", K, N, seed=0)
    spy = Spy(copy.deepcopy(soup), tent(lr=1.0))
    done = run_stream(lambda: spy, images, [segment], pre, 3, batch_size=4)
    for b, before in enumerate(spy.before):
        k, n = segment[4 * b : 4 * b + 4].T
        torch.testing.assert_close(done.logits[k, n], before)
    after = plain_logits(spy.inner.model, images, pre)
    assert not torch.allclose(after, done.logits)  # the model did change along the stream


def test_the_soup_without_tta_is_one_plain_forward_pass():
    soup, images = tiny_model(seed=3), random_images()
    pre = Preprocess.for_model(soup)
    base = plain_logits(soup, images, pre, batch_size=7)
    with torch.no_grad():
        for k in range(K):
            torch.testing.assert_close(base[k], soup(pre.normalize(images[k])))


def test_scores_are_the_online_accuracy_and_a_paired_gain_over_test_images():
    labels = torch.tensor([0, 1, 2, 0])
    logits = torch.zeros(2, 4, 3)
    logits[0, [0, 1, 2, 3], [0, 1, 2, 1]] = 1  # corruption 0: 3 of 4 right
    logits[1, [0, 1, 2, 3], [0, 0, 0, 0]] = 1  # corruption 1: 2 of 4 right
    correct = correct_of(logits, labels)
    base = np.zeros_like(correct)
    out = score(correct, base, np.array([10, 11, 12, 13]), ["a", "b"], resamples=200)
    assert out["accuracy"] == pytest.approx(62.5) and out["per_corruption"] == {"a": 75.0, "b": 50.0}
    assert out["gain"]["mean"] == pytest.approx(62.5) and out["gain"]["clusters"] == 4 and out["gain"]["images"] == 8


# -- choices and the command --------------------------------------------------------------------------------------------


def test_choose_picks_the_best_factor_and_breaks_ties_toward_the_default_lr():
    scores = {"tent": {"0.25": 50.0, "1": 60.0, "4": 55.0}, "sar": {"0.25": 70.0, "1": 70.0, "4": 65.0},
              "eata": {"0.25": 40.0, "4": 40.0}, "roid": {"0.25": 1.0, "1": 2.0, "4": 3.0}}
    assert tta_stream.choose_factors(scores) == {"tent": 1.0, "sar": 1.0, "eata": 0.25, "roid": 4.0}
    assert tta_stream.default_base_lr("tent") == TTAConfig(method="tent").lr()


@pytest.fixture
def fake_bench(tmp_path, monkeypatch):
    """A bench configuration whose 'self' run holds two tiny soups, and a stream of random images in place of CIFAR-10-C."""
    run = tmp_path / "runs" / "self"
    for rel, seed in ((("soups", "supervised_soup.safetensors"), 4), (("soup.safetensors",), 5)):
        model = tiny_model(seed=seed)
        save_checkpoint(run.joinpath(*rel), model.state_dict(), model_meta(model))
    configs = {}
    for split in ("tuning", "report"):
        configs[split] = tmp_path / f"{split}.json"
        configs[split].write_text(json.dumps({"split": split, "severity": 5, "seed": 0, "corruptions": ["fog", "snow"],
                                              "bootstrap_resamples": 100}))

    def open_bench(path):
        from adaptsoup_bench.shift_config import BenchConfig

        return BenchConfig(**json.loads(open(path).read())), run

    def prepare_stream(cfg, args, model, progress):
        images = random_images(2, 8, seed=6 if cfg.split == "tuning" else 7)
        labels = torch.from_numpy(np.random.default_rng(1).integers(0, 3, 8))
        fisher = [torch.randn(4, 3, 32, 32)] if "eata" in args.methods or args.foa else None
        stream = tta_stream.Stream(images, labels, np.arange(8), list(cfg.corruptions), Preprocess.for_model(model), 0,
                                   tmp_path / "work" / cfg.split, fisher, cfg.bootstrap_resamples)
        return stream, 20

    monkeypatch.setattr(tta_stream, "BATCH", 4)  # several batches per corruption of 8 images
    monkeypatch.setattr(tta_stream, "open_bench", open_bench)
    monkeypatch.setattr(tta_stream, "prepare_stream", prepare_stream)
    return tmp_path, configs


def test_choose_on_tuning_then_the_frozen_lrs_once_on_report(fake_bench, capsys):
    tmp_path, configs = fake_bench
    common = ["--methods", "tent,eata", "--lr-factors", "1,400", "--no-progress", "--work", str(tmp_path / "work")]
    tuned = tta_stream.main(["--bench-config", str(configs["tuning"]), "--choose", "--soups", "supervised_soup",
                             "--out", str(tmp_path / "tuning"), *common])
    choice = json.loads((tmp_path / "tuning" / "tta_stream_choice.json").read_text())
    assert choice["split"] == "tuning" and choice["lr_factors"] == [1.0, 400.0] and choice["settings"] == ["reset"]
    assert choice["chosen_factor"] == tta_stream.choose_factors(choice["scores"])
    for m in ("tent", "eata"):
        assert choice["base_lr"][m] == pytest.approx(tta_stream.default_base_lr(m) * choice["chosen_factor"][m])
        reset = [r for r in tuned["tuning"]["rows"] if r["method"] == m]
        assert [r["lr_factor"] for r in reset] == [1.0, 400.0]
        assert choice["scores"][m] == {f"{r['lr_factor']:g}": r["accuracy"] for r in reset}
    assert {(r["setting"], r["label"]) for r in tuned["rows"]} == {(s, m) for s in ("reset", "continual", "mixed") for m in ("tent", "eata")}
    for r in tuned["tuning"]["rows"]:  # per 64 images, scaled to the batch
        assert r["lr"] == pytest.approx(tta_stream.default_base_lr(r["method"]) * r["lr_factor"] / 64 * 4)
    assert tuned["command"].startswith("python -m adaptsoup_bench.tta_stream --bench-config")
    printed = capsys.readouterr().out
    assert "supervised_soup continual tent lr" in printed and "images/s" in printed

    report = tta_stream.main(["--bench-config", str(configs["report"]), "--choice", str(tmp_path / "tuning" / "tta_stream_choice.json"),
                              "--settings", "reset,mixed", "--guard-variants", "--out", str(tmp_path / "report"), *common])
    assert report["base_lr"] == choice["base_lr"] and report["tuning"] is None
    assert {(r["soup"], r["setting"], r["label"]) for r in report["rows"]} == {
        (soup, s, label) for soup in ("supervised_soup", "self_soup_target") for s in ("reset", "mixed") for label in ("tent", "eata")
    } | {(soup, "mixed", f"{m}+guard") for soup in ("supervised_soup", "self_soup_target") for m in ("tent", "eata")}
    for r in report["rows"]:
        assert r["resets"]["stream"] == (1 if r["setting"] == "reset" else 0)
        assert r["accuracy"] - r["soup_accuracy"] == pytest.approx(r["gain"]["mean"])
        assert r["soup_accuracy"] == pytest.approx(report["baseline"][r["soup"]]["accuracy"])
    json_file = tmp_path / "report" / "tta_stream_report_s5_n8.json"
    assert json.loads(json_file.read_text())["benchmark"] == "tta-stream"
    assert render_reports(tmp_path / "report", write=False) == {}  # the report is its JSON rendered
    again = tta_stream.main(["--bench-config", str(configs["report"]), "--choice", str(tmp_path / "tuning" / "tta_stream_choice.json"),
                             "--settings", "reset,mixed", "--guard-variants", "--out", str(tmp_path / "again"), *common])
    assert [r["wall_s"] for r in again["rows"]] == [r["wall_s"] for r in report["rows"]]  # finished runs are kept


@pytest.mark.parametrize("split,mode", [("report", ["--choose"]), ("tuning", ["--choice", "CHOICE"])])
def test_each_mode_refuses_the_other_split_in_one_line(fake_bench, capsys, split, mode):
    tmp_path, configs = fake_bench
    mode = [str(tmp_path / "choice.json") if m == "CHOICE" else m for m in mode]
    with pytest.raises(SystemExit) as exc:
        tta_stream.main(["--bench-config", str(configs[split]), *mode, "--no-progress", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the {split!r} split" in err


def test_a_choice_not_made_on_the_tuning_split_is_refused(fake_bench, capsys):
    tmp_path, configs = fake_bench
    bad = tmp_path / "choice.json"
    bad.write_text(json.dumps({"split": "report", "base_lr": {"tent": 1e-3}}))
    with pytest.raises(SystemExit):
        tta_stream.main(["--bench-config", str(configs["report"]), "--choice", str(bad), "--methods", "tent", "--no-progress"])
    assert "not chosen on the tuning split" in capsys.readouterr().err


def test_foa_adapts_each_soups_onnx_export_fp32_and_int8_in_the_reset_setting(fake_bench):
    tmp_path, configs = fake_bench
    choice = tmp_path / "choice.json"
    choice.write_text(json.dumps({"split": "tuning", "base_lr": {"tent": 2.5e-4}}))
    out = tta_stream.main(["--bench-config", str(configs["report"]), "--choice", str(choice), "--methods", "tent", "--settings", "reset",
                           "--foa", "--foa-per-corruption", "4", "--int8", "--no-progress", "--out", str(tmp_path / "foa"),
                           "--work", str(tmp_path / "work")])
    foa = {(r["soup"], r["label"]): r for r in out["rows"] if r["method"] == "foa"}
    assert set(foa) == {(s, label) for s in ("supervised_soup", "self_soup_target") for label in ("foa", "foa-int8")}
    for r in foa.values():
        assert r["setting"] == "reset" and r["images"] == 2 * 4 and r["resets"]["stream"] == 1 and r["lr"] is None
        assert r["forward_passes_per_batch"] == 28 and r["source_images"] == 4 and r["gain"]["clusters"] == 4
        assert r["accuracy"] - r["soup_accuracy"] == pytest.approx(r["gain"]["mean"])
    assert foa[("supervised_soup", "foa")]["onnx"].endswith("soup.prompted.onnx")
    text = (tmp_path / "foa" / "tta_stream_report_s5_n8.md").read_text()
    assert "| supervised_soup | foa-int8 | — | " in text and "FOA (forward-only" in text


def test_the_report_renders_from_a_small_result():
    gain = {"mean": 2.1, "ci95": [1.0, 3.2], "images": 30, "clusters": 10, "resamples": 100}
    row = {"soup": "supervised_soup", "method": "sar", "label": "sar", "setting": "reset", "base_lr": 1e-3, "accuracy": 71.2, "gain": gain, "wall_s": 12.0,
           "images_per_s": 2.5, "resets": {"method": 1, "guard": 0, "stream": 2}, "per_corruption": {"fog": 70.0, "snow": 72.4}}
    out = {"benchmark": "tta-stream", "command": "python -m adaptsoup_bench.tta_stream --choice c.json", "commit": "0123456789",
           "source_dirty": True, "machine": {"cpu": "a CPU"}, "threads": 2, "split": "report", "severity": 5, "per_corruption": 1000,
           "stream_size": "quick", "corruptions": ["fog", "snow"], "batch_size": 64, "settings": ["reset", "continual"],
           "methods": ["sar"], "soups": {"supervised_soup": "x"}, "base_lr": {"sar": 1e-3}, "choice": "c.json",
           "baseline": {"supervised_soup": {"accuracy": 69.1, "per_corruption": {"fog": 68.0, "snow": 70.2}}},
           "rows": [row], "tuning": None, "timings_s": {"total": 90.0}, "notes": ["Stream size: quick."]}
    text = renderer("tta-stream")(out)
    assert "| supervised_soup | none (the soup) | — | 69.10 | 69.10 |" in text
    assert "| supervised_soup | sar | 1.00e-03 | 71.20 (+2.10 [+1.00, +3.20]) · 12 s | — |" in text
    assert "(with uncommitted changes)" in text and "| supervised_soup | sar | 70.0 | 72.4 |" in text
    assert text.endswith("## Notes\n\nStream size: quick.\n")


def test_the_deployed_model_and_the_task_vector_soup_are_adaptable_too(tmp_path):
    from adaptsoup.core.checkpoint import read_checkpoint
    from adaptsoup.errors import AdaptsoupError
    from adaptsoup_bench.shift_config import BenchConfig

    deployed, pretrained, inter = tiny_model(seed=1), tiny_model(seed=2), tiny_model(seed=3)
    stock = save_checkpoint(tmp_path / "stock.safetensors", deployed.state_dict(), model_meta(deployed))
    pre_path = save_checkpoint(tmp_path / "stock_mae.safetensors", pretrained.state_dict(), model_meta(pretrained))
    run = tmp_path / "runs" / "self"
    encoder = save_checkpoint(run / "inter" / "mae00.safetensors", inter.state_dict(), model_meta(inter))
    (run / "manifest.json").write_text(json.dumps({"ingredients": {"mae00-ft00": {"inter": "mae00"}}}))
    assert tta_stream.soup_path("deployed", BenchConfig(stock=str(stock)), run) == stock
    with pytest.raises(AdaptsoupError, match="pretrained"):
        tta_stream.soup_path("task_vector_soup", BenchConfig(stock=str(stock)), run)
    cfg = BenchConfig(stock=str(stock), protocol="pretrained", pretrained=str(pre_path))
    path = tta_stream.soup_path("task_vector_soup", cfg, run)
    assert path.name == "task_vector_soup_x1.5.safetensors" and encoder.is_file()
    soup, _ = read_checkpoint(path)
    key = "blocks.0.attn.qkv.weight"
    expected = deployed.state_dict()[key].double() + 1.5 * (inter.state_dict()[key].double() - pretrained.state_dict()[key].double())
    assert torch.allclose(soup[key].double(), expected, atol=1e-5)
    assert tta_stream.parse(["--bench-config", "x", "--choose", "--soups", "task_vector_soup,deployed", "--label", "v1"]).soups == [
        "task_vector_soup", "deployed"]


def test_method_settings_override_one_field_and_refuse_unknown_ones():
    from adaptsoup.errors import AdaptsoupError

    fixed = tta_stream.method_settings(["roid.roid_prior=none", "roid.roid_consistency=false", "eata.d_margin=0.2"])
    assert fixed == {"eata": {"d_margin": 0.2}, "roid": {"roid_prior": "none", "roid_consistency": False}}
    cfg = tta_stream.tta_config("roid", 1e-4, 0, settings=fixed)
    assert cfg.roid_prior == "none" and cfg.roid_consistency is False and tta_stream.tta_config("roid", 1e-4, 0).roid_prior != "none"
    assert tta_stream.method_settings([], {"sar": {"rho": 0.1}}) == {"sar": {"rho": 0.1}}  # a frozen choice's settings
    for bad in ("roid.nonsense=1", "foo.rho=1", "sar.base_lr=1", "sar.rho"):
        with pytest.raises(AdaptsoupError, match="METHOD.KEY=VALUE"):
            tta_stream.method_settings([bad])
