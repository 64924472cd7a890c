"""``bench imagenet-c`` under the protocol of ``bench c10c`` (issue #21 item 4): --protocol, --pretrained, --split and
the task-vector rows, on tiny generated trees in the ImageNet-C and the LAION-C layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.models import model_meta
from adaptsoup.errors import AdaptsoupError
from adaptsoup.ssl.mae import MaskedAutoencoder
from adaptsoup_bench.imagenet_c import clean_selection
from adaptsoup_bench.shiftsets import imagenet_wnids, select_shift_files
from adaptsoup_cli.main import main
from helpers import tiny_model, write_noise_images

# 19 ImageNet classes renumbered 0-18 and LAION-C's fish and fruit superclasses (tests/fixtures/laion-c/README.md)
MAPPING = Path(__file__).resolve().parent / "fixtures" / "laion-c"
FISH = ["n01440764", "n01443537"]  # tench, goldfish: members of "fish"
FRUIT = "n07742313"  # Granny Smith: a member of "fruit"
# quick mode cut down to seconds; the rows and the protocol stay whole (no SAR, no centred Self-Seasoning: not asked here)
FAST = ["inter_lrs=1e-3", "inter_steps=2", "ft_lrs=1e-3", "ft_steps=2", "vanilla=1", "batch_size=4", "source_images=0",
        "self_season_epochs=1", "self_season_subset=0", "sar=false", "centered=false", "bf16=false", "bootstrap_resamples=100"]


def stocks(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny 19-way deployed model carrying its metadata (wnid class names), and the pre-trained stock beside it
    where the protocol looks by default (``<stem>_mae.safetensors``: an encoder and its MAE decoder)."""
    wnids = imagenet_wnids(MAPPING)
    model = tiny_model(num_classes=len(wnids), class_names=wnids)
    stock = save_checkpoint(tmp_path / "in1k.safetensors", model.state_dict(), model_meta(model))
    pre = tiny_model(num_classes=len(wnids), seed=3, class_names=wnids)
    pretrained = save_checkpoint(tmp_path / "in1k_mae.safetensors",
                                 {**pre.state_dict(), **MaskedAutoencoder(pre).decoder_state_dict()}, model_meta(pre))
    return stock, pretrained


def tree(root: Path, layout: str, severity: int, per_class: int = 4) -> list[str]:
    """``fog`` and ``mosaic`` at ``severity`` in ``layout``, ``per_class`` images in each class folder; the class folders."""
    labels = FISH if layout == "imagenet-c" else ["fish", "fruit"]
    level = str(severity) if layout == "imagenet-c" else f"intensity_level_{severity}"
    for c in ("fog", "mosaic"):
        for i, label in enumerate(labels):
            write_noise_images(root / c / level / label, per_class, seed=i)  # the same file names under every corruption
    return labels


def source_and_clean(tmp_path: Path) -> tuple[Path, Path]:
    for i, w in enumerate([*FISH, FRUIT]):
        write_noise_images(tmp_path / "source" / w, 4, seed=10 + i)
        write_noise_images(tmp_path / "clean" / w, 4, seed=20 + i)  # ImageNet val-like: wnid folders
    return tmp_path / "source", tmp_path / "clean"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return (0 if info.value.code is None else info.value.code), captured.out, captured.err


def bench(tmp_path: Path, stock: Path, *args: str) -> list[str]:
    source, clean = source_and_clean(tmp_path)
    sets = [x for s in FAST for x in ("--set", s)]
    return ["bench", "imagenet-c", "--root", tmp_path / "root", "--model", stock, "--source", source, "--clean", clean,
            "--mapping-dir", MAPPING, "--out", tmp_path / "results", "--work", tmp_path / "work", "--no-progress", *sets, *args]


def test_imagenet_c_pretrained_protocol_on_the_report_split_end_to_end(tmp_path, capsys):
    stock, pretrained = stocks(tmp_path)
    tree(tmp_path / "root", "imagenet-c", 5)
    code, out, err = run_cli(capsys, *bench(tmp_path, stock, "--protocol", "pretrained", "--split", "report"))
    assert code == 0, err
    result = json.loads((tmp_path / "results" / "imagenet-c_quick_s5.json").read_text())
    assert result["benchmark"] == "imagenet-c" and result["severity"] == 5
    assert result["protocol"] == "pretrained" and result["pretrained"] == str(pretrained)
    split = result["split"]
    assert split["used"] == "report" and "second half" in split["report"]
    # the report half: the last 2 of each class folder's 4 images, the same files under both corruptions
    report = [f"{w}/img_{i:03d}.png" for w in FISH for i in (2, 3)]
    assert split["corrupted_files"] == {"every corruption": report}
    assert split["per_class"] == {"every corruption": {w: 2 for w in FISH}}
    assert split["clean_files"] == [f"{w}/img_{i:03d}.png" for w in (*FISH, FRUIT) for i in (2, 3)]
    assert result["data"]["target_images"] == 4 and result["data"]["eval_images"]["clean"] == 6  # 2 of 4 per corruption
    names = [r["name"] for r in result["rows"]]
    assert {"self_task_vector_soup", "cont_ssl_task_vector_soup", "cont_ssl_soup", "supervised_soup"} <= set(names)
    assert not any("+sar" in n for n in names)
    assert {"self_task_vector_soup-deployed", "self_task_vector_soup-cont_ssl_task_vector_soup"} <= set(result["paired"])
    assert all(r["clean"] is not None and 0 <= r["disjoint"] <= 100 for r in result["rows"])
    manifest = json.loads((Path(result["runs"]["self"]) / "manifest.json").read_text())
    assert manifest["protocol"] == "pretrained" and manifest["config"]["pretrained"] == str(pretrained)
    assert "protocol pretrained, split report" in " ".join(out.split())
    assert "split **report**" in (tmp_path / "results" / "imagenet-c_quick_s5.md").read_text()
    # the estimates need 100 clean images none of the corrupted ones come from; this tree has 6, so the entry says why
    assert "--clean" in result["estimates"]["skipped"] and "estimates" in result["timings_s"]
    assert "Label-free estimates: none" in (tmp_path / "results" / "imagenet-c_quick_s5.md").read_text()


def test_laion_c_pretrained_protocol_on_the_tuning_split_end_to_end(tmp_path, capsys):
    stock, pretrained = stocks(tmp_path)
    tree(tmp_path / "root", "laion-c", 3)  # --split tuning defaults to severity 3, as for c10c
    explicit = tmp_path / "elsewhere.safetensors"
    explicit.write_bytes(pretrained.read_bytes())
    code, _, err = run_cli(capsys, *bench(tmp_path, stock, "--protocol", "pretrained", "--pretrained", explicit, "--split", "tuning"))
    assert code == 0, err
    result = json.loads((tmp_path / "results" / "laion-c_quick_s3.json").read_text())
    assert result["benchmark"] == "laion-c" and result["pretrained"] == str(explicit)
    assert result["split"]["corrupted_files"] == {"every corruption": [f"{c}/img_{i:03d}.png" for c in ("fish", "fruit") for i in (0, 1)]}
    # wnid clean folders score as their superclass; the links keep the wnid in their names
    assert result["split"]["clean_files"] == [f"{w}/img_{i:03d}.png" for w in (*FISH, FRUIT) for i in (0, 1)]
    assert {"self_task_vector_soup", "cont_ssl_task_vector_soup"} <= {r["name"] for r in result["rows"]}
    assert result["paired"] == {}  # superclass scoring: no per-image top-1, no bootstrap


@pytest.mark.parametrize("layout", ["imagenet-c", "laion-c"])
def test_split_halves_are_disjoint_class_balanced_and_deterministic(tmp_path, layout):
    labels = tree(tmp_path / "root", layout, 5, per_class=5)
    write_noise_images(tmp_path / "root" / "fog" / ("5" if layout == "imagenet-c" else "intensity_level_5") / labels[0] / "sub", 2, seed=9)
    halves = {s: select_shift_files(tmp_path / "root", layout, 5, split=s) for s in ("tuning", "report", "all")}
    for c in ("fog", "mosaic"):
        tuning, report, every = ([p for p, _ in halves[s][c]] for s in ("tuning", "report", "all"))
        assert not set(tuning) & set(report) and sorted(tuning + report) == sorted(every)
        for label in labels:
            n = sum(1 for _, lab in halves["all"][c] if lab == label)
            mine = [p for p, lab in halves["tuning"][c] if lab == label]
            assert len(mine) == n // 2  # class-balanced: half of every class folder, the rest to report
            ordered = sorted((p for p, lab in halves["all"][c] if lab == label), key=lambda p: p.relative_to(tmp_path / "root" / c).as_posix())
            assert mine == ordered[: n // 2]  # the first half in sorted order
    assert select_shift_files(tmp_path / "root", layout, 5, split="tuning") == halves["tuning"]  # deterministic
    few = select_shift_files(tmp_path / "root", layout, 5, split="report", per_corruption=3, seed=1)
    assert all(set(v) <= set(halves["report"][c]) and len(v) == 3 for c, v in few.items())  # a draw within the half
    # the clean folder is halved by the same rule
    source_and_clean(tmp_path)
    names = FISH + [FRUIT] if layout == "imagenet-c" else ["fruit", "fish"]
    clean = {s: clean_selection(tmp_path / "clean", layout, names, MAPPING, s, 0, 1) for s in ("tuning", "report")}
    assert {p for p, _, _ in clean["tuning"]}.isdisjoint(p for p, _, _ in clean["report"])
    assert [p.name for p, _, _ in clean["tuning"]] == ["img_000.png", "img_001.png"] * 3
    if layout == "laion-c":
        assert [label for _, label, _ in clean["tuning"]] == ["fish"] * 4 + ["fruit"] * 2
        assert clean["tuning"][0][2] == f"{FISH[0]}_img_000.png"


@pytest.mark.parametrize("args, fragment", [
    (["--protocol", "other"], "--protocol must be one of deployed, pretrained"),
    (["--split", "test"], "--split must be one of all, tuning, report"),
    (["--protocol", "pretrained"], "pre-trained stock not found"),
    (["--protocol", "pretrained", "--pretrained", "missing.safetensors"], "missing.safetensors"),
    (["--set", "protocol=pretrained"], "use --protocol"),
    (["--set", "split=report"], "use --split"),
    (["--set", "pretrained=x.safetensors"], "use --pretrained"),
])
def test_bad_protocol_split_or_pretrained_stock_is_one_line(tmp_path, capsys, args, fragment):
    wnids = imagenet_wnids(MAPPING)
    model = tiny_model(num_classes=len(wnids), class_names=wnids)
    stock = save_checkpoint(tmp_path / "in1k.safetensors", model.state_dict(), model_meta(model))  # no _mae stock beside it
    code, _, err = run_cli(capsys, "bench", "imagenet-c", "--root", tmp_path, "--model", stock, "--source", tmp_path,
                           "--work", tmp_path / "work", "--no-progress", *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("adaptsoup: error:") and fragment in lines[0], err


def test_a_split_with_no_images_is_a_clear_error(tmp_path):
    tree(tmp_path / "root", "imagenet-c", 5, per_class=1)  # one image per class: all of it goes to report
    assert len(select_shift_files(tmp_path / "root", "imagenet-c", 5, split="report")["fog"]) == 2
    with pytest.raises(AdaptsoupError, match="tuning split of fog, mosaic holds no images"):
        select_shift_files(tmp_path / "root", "imagenet-c", 5, split="tuning")
