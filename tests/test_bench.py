"""The CIFAR-10-C benchmark harness end to end on a tiny stock and a tiny CIFAR-like tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaptsoup_bench.shift import ROW_NAMES, C10CConfig, bench_work_dir, clean_indices, results_stem, run_c10c, sanity_checks
from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.data import Preprocess, load_folder
from adaptsoup.errors import AdaptsoupError
from adaptsoup.ssl.mae import MaskedAutoencoder
from adaptsoup.core.models import load_model, model_meta
from helpers import CLASS_NAMES, tiny_model, write_noise_images


def tiny_stock_and_cifar(tmp_path):
    """A tiny stock with its MAE decoder beside it, and a CIFAR-like train/test tree of 6 noise images per class."""
    model = tiny_model()
    stock = save_checkpoint(tmp_path / "stock.safetensors", model.state_dict(), model_meta(model))
    save_checkpoint(tmp_path / "stock_mae_decoder.safetensors", MaskedAutoencoder(model).decoder_state_dict(), None)
    for i, name in enumerate(CLASS_NAMES):
        write_noise_images(tmp_path / "cifar" / "train" / name, 6, seed=i)
        write_noise_images(tmp_path / "cifar" / "test" / name, 6, seed=10 + i)
    return stock


def _accuracy(checkpoint: Path, folder: Path, indices: list[int]) -> float:
    """Top-1 (percent) of ``checkpoint`` on the images ``indices`` of the labeled ``folder`` (load_folder's order)."""
    model = load_model(None, checkpoint).eval()
    pre = Preprocess.for_model(model)
    images = load_folder(folder, pre, labeled=True, class_names=CLASS_NAMES)
    pick = torch.tensor(indices)
    with torch.no_grad():
        predicted = model(pre.normalize(images.images[pick])).argmax(1)
    return float((predicted == images.labels[pick]).double().mean() * 100)


def _is_count(accuracy: float, images: int) -> bool:
    """``accuracy`` (percent) is k of ``images`` right, for a whole k (up to the 2-decimal rounding of a report)."""
    return abs(accuracy * images / 100 - round(accuracy * images / 100)) < 1e-3 * images


def test_c10c_harness_writes_the_tables(tmp_path):
    stock = tiny_stock_and_cifar(tmp_path)
    cfg = C10CConfig(mode="quick", stock=str(stock), data=str(tmp_path / "cifar"), out=str(tmp_path / "results"),
                     work=str(tmp_path / "work"), corruptions=["gaussian_noise", "contrast"], per_corruption=12, clean_images=9,
                     source_images=12, inter_lrs=[1e-3], inter_steps=2, ft_lrs=[1e-3, 2e-3], ft_steps=2, vanilla=2, batch_size=6,
                     self_season_epochs=1, self_season_subset=0, sar_batch=4, bf16=False)
    result = run_c10c(cfg, command="test", log=lambda m: None)
    saved = json.loads((tmp_path / "results" / "c10c_quick_s5.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert [r["name"] for r in saved["rows"]] == list(ROW_NAMES)
    for key in ("benchmark", "mode", "severity", "command", "commit", "machine", "wall_time_s", "stock"):
        assert key in saved
    # the stock's clean accuracy is its top-1 on the recorded clean images, computed here
    assert saved["stock"]["clean_acc"] == pytest.approx(_accuracy(stock, tmp_path / "cifar" / "test", saved["split"]["clean_indices"]), abs=1e-5)  # float32 percent
    assert {r["name"]: r for r in saved["rows"]}["deployed"]["clean"] == saved["stock"]["clean_acc"]
    for r in saved["rows"]:
        assert set(r["per_corruption"]) == {"gaussian_noise", "contrast"}
        # disjoint: the mean over corruptions of the accuracy on each one's 6 odd images (a count of 6)
        assert all(_is_count(a, 6) for a in r["per_corruption"].values()), r
        assert r["disjoint"] == pytest.approx(sum(r["per_corruption"].values()) / 2, abs=1e-5)
        assert r["clean"] is None or _is_count(r["clean"], 9)
    assert saved["data"]["target_images"] == 12  # 2 corruptions x 6 even images
    cost = saved["self_season_cost"]
    assert cost["ingredients"] == 2 and cost["stacked_mb"] > 0 and cost["wall_s"] >= 0
    assert saved["checks"]["chance"] == pytest.approx(100 / len(CLASS_NAMES))
    assert set(saved["checks"]) >= {"deployed_near_chance", *(f"{n}_change" for n in ROW_NAMES if "+sar" in n)}
    by_name = {r["name"]: r for r in saved["rows"]}
    # the paper's SAR setting and the reference's, each lr scaled to the batch (lr = base / 64 x batch)
    assert by_name["self_soup_target+sar"]["sar_lr"] == pytest.approx(5e-5 / 64 * 4)
    assert by_name["self_soup_target+sar_reference_lr"]["sar_lr"] == pytest.approx(1e-3 / 64 * 4)
    assert by_name["supervised_soup+sar_reference_lr"]["base"] == "supervised_soup"
    table = (tmp_path / "results" / "c10c_quick_s5.md").read_text()
    assert "Table 2" in table and "Self-Seasoning: 2 ingredients" in table
    assert "| self_soup_target | 5e-05 |" in table and "| supervised_soup | 0.001 |" in table
    assert (tmp_path / "results" / "c10c_quick_s5.md").read_text().startswith("# CIFAR-10")
    assert (tmp_path / "results" / "c10c_quick_s5_per_corruption.png").is_file()
    # the even/odd split is disjoint and covers the selection
    even = {p.name for p in (tmp_path / "work").rglob("even/gaussian_noise/*/*.png")}
    odd = {p.name for p in (tmp_path / "work").rglob("odd/gaussian_noise/*/*.png")}
    assert len(even) == len(odd) == 6 and not even & odd


def test_sanity_checks_flag_chance_and_sar_drops():
    rows = [
        {"name": "deployed", "per_corruption": {"fog": 80.0, "contrast": 12.0}},
        {"name": "soup", "per_corruption": {"fog": 70.0, "contrast": 50.0}},
        {"name": "soup+sar", "per_corruption": {"fog": 68.5, "contrast": 50.5}},
    ]
    checks = sanity_checks(rows, chance=10.0)
    assert checks["deployed_near_chance"] == ["contrast"]
    change = checks["soup+sar_change"]
    assert change["worst"] == pytest.approx(-1.5) and change["worst_corruption"] == "fog"
    assert change["below_tolerance"] == ["fog"] and change["mean"] == pytest.approx(-0.5)
    assert "deployed_near_chance" not in sanity_checks(rows, chance=None)
    # a row naming its base is compared with that base, whatever its name
    rows.append({"name": "soup+sar_other", "base": "soup", "per_corruption": {"fog": 72.0, "contrast": 47.0}})
    other = sanity_checks(rows, chance=10.0)["soup+sar_other_change"]
    assert other["below_tolerance"] == ["contrast"] and other["worst"] == pytest.approx(-3.0)


def test_missing_stock_is_a_clear_error(tmp_path):
    with pytest.raises(AdaptsoupError, match="make stock"):
        run_c10c(C10CConfig(stock=str(tmp_path / "none.safetensors"), out=str(tmp_path)), log=lambda m: None)


from adaptsoup_bench.shift import BenchConfig, run_imagenet_c  # noqa: E402
from adaptsoup.core.models import create_model  # noqa: E402
from adaptsoup_bench.shiftsets import (  # noqa: E402
    default_mapping_dir, detect_layout, imagenet_wnids, scan_shift_tree, subset_sorted, superclass_membership, superclass_scorer,
)

# LAION-C's fruit and fish superclasses and their 18 ImageNet classes (+1 outside them), renumbered 0-18: a 19-way
# model stands in for a 1000-way one (tests/fixtures/laion-c/README.md)
MAPPING = Path(__file__).resolve().parent / "fixtures" / "laion-c"


def _imagenet_stock(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_pico_patch4_32", num_classes=len(imagenet_wnids(MAPPING)))
    return save_checkpoint(tmp_path / "in1k.safetensors", model.state_dict(), model_meta(model))


def test_the_default_mapping_is_the_shared_reference():
    assert default_mapping_dir().parts[-3:] == ("shared", "reference", "laion-c")


def test_superclass_scoring_averages_member_probabilities():
    names, member = superclass_membership(MAPPING)
    assert names == ["fruit", "fish"] and member.shape == (19, 2) and int(member.sum()) == 18
    wnids = imagenet_wnids(MAPPING)
    fish = names.index("fish")
    logits = torch.full((2, len(wnids)), -10.0)
    logits[0, wnids.index("n01440764")] = 10.0  # tench: a fish
    logits[1, wnids.index("n01440764")] = 10.0
    score = superclass_scorer(member)
    assert score(logits, torch.tensor([fish, fish])) == 100.0
    assert score(logits, torch.tensor([fish, 1 - fish])) == 50.0
    with pytest.raises(AdaptsoupError, match="19-way"):
        score(torch.zeros(1, 1000), torch.tensor([fish]))


def test_layouts_are_detected_and_split_by_sorted_position(tmp_path):
    for c in ("fog", "snow"):
        for w in ("n01440764", "n01443537"):
            write_noise_images(tmp_path / "inc" / c / "5" / w, 3, seed=1)
    write_noise_images(tmp_path / "lc" / "mosaic" / "intensity_level_5" / "fish", 2, seed=2)
    assert detect_layout(tmp_path / "inc") == "imagenet-c" and detect_layout(tmp_path / "lc") == "laion-c"
    files = scan_shift_tree(tmp_path / "inc", "imagenet-c", 5)
    assert list(files) == ["fog", "snow"] and len(files["fog"]) == 6
    assert [label for _, label in files["fog"]] == ["n01440764"] * 3 + ["n01443537"] * 3
    with pytest.raises(AdaptsoupError, match="severity 3"):
        scan_shift_tree(tmp_path / "inc", "imagenet-c", 3)
    # a per-corruption subset is a seeded choice that keeps the sorted order (the even/odd split follows it)
    few = subset_sorted(files, 4, seed=0)
    assert [len(v) for v in few.values()] == [4, 4]
    assert few["fog"] == [item for item in files["fog"] if item in few["fog"]]  # in sorted order
    assert few == subset_sorted(files, 4, seed=0) and subset_sorted(files, 0, seed=0) == files


@pytest.mark.parametrize("layout", ["imagenet-c", "laion-c"])
def test_imagenet_c_and_laion_c_harness_end_to_end(tmp_path, layout):
    stock = _imagenet_stock(tmp_path)
    labels = ["n01440764", "n01443537"] if layout == "imagenet-c" else ["fish", "fruit"]
    level = "5" if layout == "imagenet-c" else "intensity_level_5"
    for c in ("fog", "mosaic"):
        for i, label in enumerate(labels):
            write_noise_images(tmp_path / "root" / c / level / label / "sub", 4, seed=i)
    for i, w in enumerate(["n01440764", "n01443537", "n07742313"]):
        write_noise_images(tmp_path / "source" / w, 4, seed=10 + i)
    cfg = BenchConfig(mode="quick", stock=str(stock), out=str(tmp_path / "results"), work=str(tmp_path / "work"), corruptions=[],
                      source_images=0, inter_lrs=[1e-3], inter_steps=2, ft_lrs=[1e-3], ft_steps=2, vanilla=1, batch_size=4,
                      self_season_epochs=1, self_season_subset=0, sar_batch=4, bf16=False)
    result = run_imagenet_c(cfg, str(tmp_path / "root"), str(tmp_path / "source"), mapping_dir=str(MAPPING), log=lambda m: None)
    assert result["benchmark"] == layout
    assert [r["name"] for r in result["rows"]] == list(ROW_NAMES)
    assert all(r["clean"] is None for r in result["rows"])
    assert set(result["rows"][0]["per_corruption"]) == {"fog", "mosaic"}
    assert result["data"]["target_images"] == 8  # half of each corruption's 8 files
    assert (tmp_path / "results" / f"{layout}_quick_s5.md").is_file()


def test_ingredient_families_mix_across_losses(tmp_path):
    from adaptsoup_bench.families import FAMILIES, FamiliesConfig, run_families

    stock = tiny_stock_and_cifar(tmp_path)
    cfg = FamiliesConfig.for_mode(
        "quick", stock=str(stock), data=str(tmp_path / "cifar"), out=str(tmp_path / "results"), work=str(tmp_path / "work"),
        corruptions=["gaussian_noise", "fog"], per_corruption=12, clean_images=9, source_images=12, batch_size=6,
        self_season_epochs=1, self_season_subset=0, bf16=True, inter_steps=2, ft_steps=2, partitions=2)
    result = run_families(cfg, command="test", log=lambda m: None)
    saved = json.loads((tmp_path / "results" / "families_quick_s5.json").read_text())
    names = [r["name"] for r in saved["rows"]]
    assert names == ["deployed", *(f"{f}_soup" for f in FAMILIES), "all_families_uniform", "all_families_self_seasoned",
                     "all_families_self_seasoned_centered", "best_ingredient"]
    # two ingredients per family, each fine-tuned back once
    families = [v["family"] for v in saved["ingredients"].values()]
    assert sorted(families) == sorted(f for f in FAMILIES for _ in range(2))
    coeffs = result["rows"][-3]["coefficients"]
    assert len(coeffs) == 10 and abs(sum(coeffs.values()) - 1) < 1e-5
    # 9 clean images; 2 corruptions x 6 odd images, averaged per corruption
    assert all(_is_count(r["clean"], 9) and _is_count(2 * r["disjoint"], 6) for r in saved["rows"]), saved["rows"]
    assert saved["rows"][0]["name"] == "deployed"
    clean = clean_indices(load_folder(tmp_path / "cifar" / "test", Preprocess.for_model(tiny_model()), labeled=True, class_names=CLASS_NAMES), cfg.bench)
    assert saved["rows"][0]["clean"] == pytest.approx(_accuracy(stock, tmp_path / "cifar" / "test", clean.tolist()), abs=1e-5)  # float32 percent
    assert saved["self_season"]["stacked_mb"] > 0
    assert (tmp_path / "results" / "families_quick_s5.png").is_file()
    assert "Ingredient families" in (tmp_path / "results" / "families_quick_s5.md").read_text()


def test_unknown_family_is_a_clear_error():
    from adaptsoup_bench.families import FamiliesConfig, family_recipes

    with pytest.raises(AdaptsoupError, match="unknown ingredient famil"):
        family_recipes(FamiliesConfig(families=["mae", "simclr"]))


def test_work_folders_are_named_by_every_setting_and_the_stock(tmp_path):
    from adaptsoup_bench.shift import bench_work_dir

    stock = tiny_stock_and_cifar(tmp_path)
    cfg = BenchConfig.for_mode("quick", stock=str(stock), work=str(tmp_path / "work"))
    first = bench_work_dir(cfg, "c10c")
    assert first == bench_work_dir(BenchConfig.for_mode("quick", stock=str(stock), work=str(tmp_path / "work"), out="elsewhere"), "c10c")
    assert first.name.startswith("c10c-quick-s5-")
    assert bench_work_dir(BenchConfig.for_mode("quick", stock=str(stock), work=str(tmp_path / "work"), inter_steps=7), "c10c") != first
    assert bench_work_dir(BenchConfig.for_mode("quick", stock=str(stock), work=str(tmp_path / "work"), severity=3), "c10c") != first
    assert bench_work_dir(cfg, "c10c", {"families": ["mae"]}) != first
    model = tiny_model(seed=1)  # another stock at the same path
    save_checkpoint(stock, model.state_dict(), model_meta(model))
    assert bench_work_dir(cfg, "c10c") != first


def test_a_label_names_the_results_but_not_the_work(tmp_path):
    plain = C10CConfig.for_mode("quick", work=str(tmp_path))
    labelled = C10CConfig.for_mode("quick", work=str(tmp_path), label="warm-decoder")
    assert results_stem("c10c", plain) == "c10c_quick_s5"
    assert results_stem("c10c", labelled) == "c10c_quick_s5_warm-decoder"
    assert bench_work_dir(plain, "c10c") == bench_work_dir(labelled, "c10c")  # same settings, same images and runs
    other = C10CConfig.for_mode("quick", work=str(tmp_path), decoder_warmup_loaded=True)
    assert bench_work_dir(other, "c10c") != bench_work_dir(plain, "c10c")


# -- issue #13: splits, paired bootstrap, the pre-trained protocol -------------------------------------------------


def test_paired_bootstrap_closed_forms():
    import numpy as np

    from adaptsoup_bench.shift import paired_bootstrap

    rng = np.random.default_rng(0)
    a = rng.random(500) < 0.6
    same = paired_bootstrap(a, a.copy(), resamples=2000, seed=1)
    assert same["mean"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["images"] == 500
    b = a.copy()
    b[np.flatnonzero(a)[:50]] = False  # b misses 50 images a gets right, and nothing else differs
    diff = paired_bootstrap(a, b, resamples=2000, seed=1)
    assert diff["mean"] == pytest.approx(10.0)  # 50 of 500 images, in points
    assert 6.0 < diff["ci95"][0] < 10.0 < diff["ci95"][1] < 14.0
    assert paired_bootstrap(np.ones(10), np.zeros(10), resamples=100)["ci95"] == [100.0, 100.0]
    assert paired_bootstrap(a, b, resamples=500, seed=3) == paired_bootstrap(a, b, resamples=500, seed=3)  # seeded
    with pytest.raises(AdaptsoupError, match="equally long"):
        paired_bootstrap(a, b[:-1])


def test_paired_bootstrap_over_clusters_widens_with_correlated_images():
    """Images of one test image (one per corruption) resampled together: with perfectly correlated copies the
    interval equals the one over the distinct images, wider than an image-level bootstrap of the copies."""
    import numpy as np

    from adaptsoup_bench.shift import paired_bootstrap

    rng = np.random.default_rng(0)
    a, b = rng.random(100) < 0.6, rng.random(100) < 0.5
    copies = 15
    a15, b15, ids = np.tile(a, copies), np.tile(b, copies), np.tile(np.arange(100), copies)
    base = paired_bootstrap(a, b, resamples=4000, seed=2)
    clustered = paired_bootstrap(a15, b15, resamples=4000, seed=2, clusters=ids)
    naive = paired_bootstrap(a15, b15, resamples=4000, seed=2)
    assert clustered["mean"] == pytest.approx(base["mean"]) and clustered["clusters"] == 100 and clustered["images"] == 1500
    assert clustered["ci95"] == pytest.approx(base["ci95"])  # the same draws of the 100 distinct images
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(naive) < 0.5 * width(clustered)  # ~1/sqrt(15) as wide: the image-level interval is overconfident


def test_tuning_and_report_splits_are_disjoint_class_balanced_halves():
    import numpy as np
    import torch

    from adaptsoup_bench.shift import split_pool

    labels = torch.arange(10).repeat_interleave(1000)  # load_folder's order: grouped by class folder
    tuning, report = split_pool(labels, "tuning"), split_pool(labels, "report")
    assert len(tuning) == len(report) == 5000 and not set(tuning) & set(report)
    assert np.bincount(labels[tuning].numpy()).tolist() == [500] * 10
    assert tuning[:3].tolist() == [0, 1, 2] and 500 not in set(tuning) and 500 in set(report)
    assert split_pool(labels, "all").tolist() == list(range(10000))
    with pytest.raises(AdaptsoupError, match="--split"):
        split_pool(labels, "test")


def test_split_sets_default_severity_and_keeps_old_work_folders(tmp_path):
    assert C10CConfig.for_mode("quick", split="tuning").severity == 3
    assert C10CConfig.for_mode("quick", split="report").severity == 5
    assert C10CConfig.for_mode("quick", split="tuning", severity=4).severity == 4
    with pytest.raises(AdaptsoupError, match="--protocol"):
        C10CConfig.for_mode("quick", protocol="other")
    # the new settings at their defaults leave the digest (and so earlier runs' work folders) as it was
    plain = C10CConfig.for_mode("quick", work=str(tmp_path))
    assert bench_work_dir(plain, "c10c") == bench_work_dir(C10CConfig.for_mode("quick", work=str(tmp_path), sar=False), "c10c")
    assert bench_work_dir(plain, "c10c") != bench_work_dir(C10CConfig.for_mode("quick", work=str(tmp_path), split="tuning", severity=5), "c10c")


def test_c10c_pretrained_protocol_on_the_tuning_split(tmp_path):
    stock = tiny_stock_and_cifar(tmp_path)
    pre = tiny_model(seed=3)
    pretrained = save_checkpoint(tmp_path / "stock_mae.safetensors", {**pre.state_dict(), **MaskedAutoencoder(pre).decoder_state_dict()},
                                 model_meta(pre))
    cfg = C10CConfig.for_mode("quick", stock=str(stock), data=str(tmp_path / "cifar"), out=str(tmp_path / "results"),
                              work=str(tmp_path / "work"), corruptions=["gaussian_noise", "contrast"], per_corruption=12, clean_images=9,
                              source_images=12, inter_lrs=[1e-3], inter_steps=2, ft_lrs=[1e-3], ft_steps=2, vanilla=2, batch_size=6,
                              self_season_epochs=1, self_season_subset=0, bf16=False, protocol="pretrained", split="tuning",
                              sar=False, centered=False, joint=False, bootstrap_resamples=200)
    result = run_c10c(cfg, command="test", log=lambda m: None)
    assert result["protocol"] == "pretrained" and result["pretrained"] == str(pretrained)
    assert result["severity"] == 3 and result["split"]["used"] == "tuning"
    # the tuning pool is the first 3 of each class's 6 test images: indices 0-2, 6-8, 12-14
    assert set(result["split"]["corrupted_indices"]) | set(result["split"]["clean_indices"]) <= {0, 1, 2, 6, 7, 8, 12, 13, 14}
    assert result["data"]["target_images"] == 10 and not any(k.startswith("even/") for k in result["data"]["eval_images"])  # joint=False; 9 tuning images, 5 even per corruption
    assert all(r["joint"] is None for r in result["rows"])
    names = [r["name"] for r in result["rows"]]
    assert "self_plus_supervised_soup" in names and not any("+sar" in n for n in names)
    pair = result["paired"]["self_soup_target-supervised_soup"]
    by_name = {r["name"]: r for r in result["rows"]}
    assert pair["disjoint"]["mean"] == pytest.approx(by_name["self_soup_target"]["disjoint"] - by_name["supervised_soup"]["disjoint"])
    assert pair["clean"]["mean"] == pytest.approx(by_name["self_soup_target"]["clean"] - by_name["supervised_soup"]["clean"])
    manifest = json.loads((Path(result["runs"]["self"]) / "manifest.json").read_text())
    assert manifest["protocol"] == "pretrained" and manifest["config"]["pretrained"] == str(pretrained)
    assert "Paired differences" in (tmp_path / "results" / "c10c_quick_s3.md").read_text()
    # the task-arithmetic row: deployed + mean(inter-trained) - pretrained, deployed head (scale 1)
    from adaptsoup.core.checkpoint import read_checkpoint

    assert "self_task_vector_soup" in names and "self_task_vector_soup-deployed" in result["paired"]
    assert "cont_ssl_task_vector_soup" in names and "self_task_vector_soup-cont_ssl_task_vector_soup" in result["paired"]
    run = Path(result["runs"]["self"])
    soup, _ = read_checkpoint(run / "soups" / "self_task_vector_soup.safetensors")
    deployed, _ = read_checkpoint(stock)
    inter, _ = read_checkpoint(run / "inter" / "mae00.safetensors")  # one inter-training run: the mean is itself
    key = "blocks.0.attn.qkv.weight"
    assert torch.allclose(soup[key].double(), deployed[key].double() + inter[key].double() - pre.state_dict()[key].double(), atol=1e-6)
    assert torch.equal(soup["head.weight"], deployed["head.weight"])


def test_trained_files_are_shared_by_configurations_that_agree_on_their_settings(tmp_path):
    from adaptsoup_bench.shift import INTER_SETTINGS, VANILLA_SETTINGS, share_trained, shared_dir

    stock = tiny_stock_and_cifar(tmp_path)
    base = dict(stock=str(stock), work=str(tmp_path / "work"), split="tuning")
    a = C10CConfig.for_mode("quick", **base, ft_steps=10)
    b = C10CConfig.for_mode("quick", **base, ft_steps=20)  # other fine-tuning, same inter-training
    assert bench_work_dir(a, "c10c") != bench_work_dir(b, "c10c")
    assert shared_dir(a, "c10c", "inter-self", INTER_SETTINGS) == shared_dir(b, "c10c", "inter-self", INTER_SETTINGS)
    assert shared_dir(a, "c10c", "vanilla", VANILLA_SETTINGS) != shared_dir(b, "c10c", "vanilla", VANILLA_SETTINGS)
    c = C10CConfig.for_mode("quick", **base, ft_steps=10, inter_steps=7)
    assert shared_dir(a, "c10c", "inter-self", INTER_SETTINGS) != shared_dir(c, "c10c", "inter-self", INTER_SETTINGS)
    assert shared_dir(a, "c10c", "vanilla", VANILLA_SETTINGS) == shared_dir(c, "c10c", "vanilla", VANILLA_SETTINGS)
    run, shared = tmp_path / "run", tmp_path / "shared"
    (run / "inter").mkdir(parents=True)
    (run / "inter" / "mae00.safetensors").write_bytes(b"encoder")
    assert share_trained(run, shared, ("inter/mae*.safetensors",), collect=True) == ["inter/mae00.safetensors"]
    other = tmp_path / "other"
    assert share_trained(other, shared, ("inter/mae*.safetensors",), collect=False) == ["inter/mae00.safetensors"]
    assert (other / "inter" / "mae00.safetensors").read_bytes() == b"encoder"
