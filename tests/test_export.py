"""ONNX export: metadata, parity with PyTorch, dynamic batch, onnxruntime fusions, int8 quantization (dynamic
and static) and folder prediction."""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptsoup.core.data import Preprocess, load_folder
from adaptsoup.errors import AdaptsoupError
from adaptsoup.deploy.onnx import ParityError, export_and_check, preprocess_from_onnx, read_onnx_metadata
from adaptsoup.deploy.predict import predict_folder
from adaptsoup.deploy.runtime import ort_session
from adaptsoup.core.models import model_meta, set_class_names
from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.deploy.quantize import StaticConfig, calibration_reader, quantize_kinds, quantize_static_int8

from helpers import ARCH, CLASS_NAMES, MEAN, STD, logits, random_batch, tiny_model, write_noise_images

NAMES = ["airplane", "boat", "car"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One fp32 + int8 export shared by the tests of this module (exporting takes seconds)."""
    model = tiny_model(seed=5)
    set_class_names(model, NAMES)
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    report = export_and_check(model, out, quantize="int8")
    return model, report


def test_export_writes_onnx_with_metadata(exported):
    model, report = exported
    path = Path(report.path)
    assert path.is_file() and path.suffix == ".onnx"
    assert report.size_bytes == path.stat().st_size > 0
    meta = read_onnx_metadata(path)
    assert meta["arch"] == ARCH
    assert meta["class_names"] == NAMES
    assert meta["input_size"] == (3, 32, 32)
    assert meta["mean"] == pytest.approx(MEAN)
    assert meta["std"] == pytest.approx(STD)
    assert meta["interpolation"] == "bicubic"
    assert meta["crop_pct"] == pytest.approx(1.0)
    assert preprocess_from_onnx(path) == Preprocess.for_model(model)


def test_export_parity(exported):
    _, report = exported
    assert report.max_abs_diff < 1e-4
    assert report.top1_agreement == 100.0
    assert report.batch_size > 1
    assert report.exporter in ("dynamo", "torchscript")


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_batch_size_is_dynamic(exported, batch):
    model, report = exported
    session = ort_session(report.path)
    (inp,) = session.get_inputs()
    assert inp.name == "input"
    assert [o.name for o in session.get_outputs()] == ["logits"]
    x = random_batch(batch, seed=batch)
    got = session.run(None, {"input": x.numpy()})[0]
    assert got.shape == (batch, 3)
    np.testing.assert_allclose(got, logits(model, x).numpy(), atol=1e-4, rtol=0)


def test_int8_quantization(exported):
    _, report = exported
    qpath = Path(report.quantized_path)
    assert qpath.name == "model.int8.onnx"
    assert qpath.parent == Path(report.path).parent
    assert qpath.is_file() and report.int8_size_bytes == qpath.stat().st_size
    assert report.int8_size_bytes < report.size_bytes
    assert report.int8_top1_agreement is not None and 0.0 <= report.int8_top1_agreement <= 100.0
    assert np.isfinite(report.int8_max_abs_diff)
    # The quantized model keeps the metadata and the dynamic batch.
    assert read_onnx_metadata(qpath)["class_names"] == NAMES
    out = ort_session(qpath).run(None, {"input": random_batch(3).numpy()})[0]
    assert out.shape == (3, 3)


def test_export_leaves_no_temporary_files(exported):
    _, report = exported
    assert sorted(os.listdir(Path(report.path).parent)) == ["model.int8.onnx", "model.onnx"]


def test_predict_folder_matches_pytorch(exported, tmp_path):
    model, report = exported
    folder = tmp_path / "images"
    write_noise_images(folder, 10, seed=11)
    write_noise_images(folder / "nested", 3, seed=12, size=(40, 48), suffix=".jpg")
    (folder / "broken.jpg").write_bytes(b"")
    (folder / "readme.txt").write_text("ignored")
    out_csv = tmp_path / "out" / "predictions.csv"

    result = predict_folder(report.path, folder, out_csv)

    assert result.images == 13
    assert [Path(p).name for p, _ in result.skipped] == ["broken.jpg"]
    with open(out_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "class", "probability"]
    rows = rows[1:]

    pre = Preprocess.for_model(model)
    images = load_folder(folder, pre, cache=False)
    with torch.no_grad():
        probs = torch.softmax(model(pre.normalize(images.images)), dim=1)
    expected = [NAMES[i] for i in probs.argmax(1).tolist()]
    assert [r[0] for r in rows] == images.paths
    assert [r[1] for r in rows] == expected
    np.testing.assert_allclose([float(r[2]) for r in rows], probs.max(1).values.numpy(), atol=1e-4)


def test_export_with_real_images_reports_accuracy(tmp_path, labeled_folder):
    model = tiny_model(seed=2)
    set_class_names(model, ["bird", "cat", "dog"])
    images = load_folder(labeled_folder, Preprocess.for_model(model), labeled=True, class_names=["bird", "cat", "dog"], cache=False)
    report = export_and_check(model, tmp_path / "m.onnx", images=images)
    assert report.batch_size == len(images)
    assert report.max_abs_diff < 1e-4
    assert report.fp32_accuracy is not None and 0.0 <= report.fp32_accuracy <= 100.0
    assert report.quantized_path is None


def test_parity_error_on_impossible_tolerance(tmp_path, pico_model):
    with pytest.raises(ParityError, match="parity"):
        export_and_check(pico_model, tmp_path / "m.onnx", tolerance=-1)


def test_not_an_adaptsoup_onnx(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(AdaptsoupError, match="not exported by adaptsoup"):
        read_onnx_metadata(path)
    with pytest.raises(AdaptsoupError, match="not found"):
        predict_folder(tmp_path / "missing.onnx", tmp_path, tmp_path / "p.csv")


def test_exporter_fallback_says_why_and_reports_the_opset_it_wrote(tmp_path, monkeypatch):
    """When the torch.export-based exporter fails, the report gives the opset in the file (17), not the one asked for."""
    import onnx

    real_export = torch.onnx.export

    def dynamo_fails(*args, dynamo=False, **kwargs):
        if dynamo:
            raise RuntimeError("torch.export could not trace this model\nmore detail")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    lines: list[str] = []
    report = export_and_check(tiny_model(seed=1), tmp_path / "m.onnx", opset=18, log=lines.append)
    assert report.exporter == "torchscript"
    declared = {o.domain: o.version for o in onnx.load(str(tmp_path / "m.onnx")).opset_import}
    assert report.opset == declared.get("", declared.get("ai.onnx")) == 17
    assert report.fallback_reason == "RuntimeError: torch.export could not trace this model"
    assert len(lines) == 1 and "torch.export could not trace this model" in lines[0] and "opset 17" in lines[0]


# ----------------------------------------------------------------------------------------------------------------
# The optimised export (onnxruntime's fused operators in the file)


def op_counts(path) -> Counter:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_the_export_holds_onnxruntime_fusions(exported):
    """vit_pico has 2 blocks: one fused Attention and one BiasGelu each; LayerNorm stays unfused from the residual add."""
    _, report = exported
    ops = op_counts(report.path)
    assert report.optimized and report.optimize_note is None
    assert ops["Attention"] == 2 and ops["BiasGelu"] == 2
    assert ops["LayerNormalization"] == 5  # norm1 + norm2 per block, and the final norm
    assert ops["SkipLayerNormalization"] == 0  # measured slower than Add + LayerNormalization on the CPU
    assert ops["Softmax"] == 0 and ops["Erf"] == 0  # nothing left outside the fused nodes
    assert report.fusions == {op: ops[op] for op in ("Attention", "BiasGelu", "LayerNormalization")}


def test_no_optimize_writes_the_plain_graph(tmp_path):
    model = tiny_model(seed=3)
    report = export_and_check(model, tmp_path / "plain.onnx", optimize=False, log=lambda _: None)
    ops = op_counts(report.path)
    assert not report.optimized and report.fusions == {} and report.optimize_note is None
    assert ops["Attention"] == 0 and ops["BiasGelu"] == 0 and ops["MatMul"] > 0
    assert report.max_abs_diff < 1e-4
    assert read_onnx_metadata(report.path)["class_names"] == CLASS_NAMES


def test_the_optimizer_failing_falls_back_to_the_plain_graph_and_says_why(tmp_path, monkeypatch):
    import adaptsoup.deploy.optimize as optimize

    def broken(proto, shape):
        raise RuntimeError("fusion exploded\nsecond line")

    monkeypatch.setattr(optimize, "fused_graph", broken)
    lines: list[str] = []
    model = tiny_model(seed=6)
    set_class_names(model, NAMES)
    report = export_and_check(model, tmp_path / "m.onnx", images=None, log=lines.append)
    assert not report.optimized and report.fusions == {}
    assert report.optimize_note == "RuntimeError: fusion exploded"
    assert len(lines) == 1 and "fusion exploded" in lines[0] and "plain graph" in lines[0] and "second line" not in lines[0]
    assert op_counts(report.path)["Attention"] == 0
    assert report.max_abs_diff < 1e-4
    assert read_onnx_metadata(report.path)["class_names"] == NAMES


def test_ort_session_threads(exported):
    _, report = exported
    session = ort_session(report.path, threads=1)
    assert session.get_session_options().intra_op_num_threads == 1
    assert session.run(None, {"input": random_batch(2).numpy()})[0].shape == (2, 3)
    with pytest.raises(AdaptsoupError, match="threads"):
        ort_session(report.path, threads=0)


# ----------------------------------------------------------------------------------------------------------------
# int8: dynamic and static (QDQ)


@pytest.mark.parametrize("value, kinds", [
    ("int8", ("dynamic",)), ("dynamic", ("dynamic",)), ("static", ("static",)), ("dynamic,static", ("dynamic", "static")),
    (["static", "int8", "dynamic"], ("static", "dynamic")), (None, ()), ([], ()),
])
def test_quantize_kinds(value, kinds):
    assert quantize_kinds(value) == kinds


@pytest.mark.parametrize("value", ["int4", "", "dynamic,fp16"])
def test_quantize_kinds_refuses_unknown_values(value):
    with pytest.raises(AdaptsoupError, match="unknown quantization"):
        quantize_kinds(value)


def test_the_dynamic_int8_model_quantizes_the_fused_attention(exported):
    _, report = exported
    ops = op_counts(report.quantized_path)
    assert ops["QAttention"] == 2 and ops["Attention"] == 0
    assert [c.kind for c in report.quantized] == ["dynamic"]


def test_static_int8_is_qdq_and_agrees_with_fp32(tmp_path):
    model = tiny_model(seed=5)
    set_class_names(model, NAMES)
    write_noise_images(tmp_path / "target", 48, seed=21)
    images = load_folder(tmp_path / "target", Preprocess.for_model(model), cache=False)
    report = export_and_check(model, tmp_path / "out" / "model.onnx", images=images, quantize="static")
    (check,) = report.quantized
    assert check.kind == "static" and Path(check.path).name == "model.int8-static.onnx"
    assert report.quantized_path is None  # the legacy fields describe the dynamic model only
    ops = op_counts(check.path)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert check.top1_agreement >= 75.0 and np.isfinite(check.max_abs_diff)
    assert check.size_bytes == Path(check.path).stat().st_size
    assert read_onnx_metadata(check.path)["class_names"] == NAMES
    out = ort_session(check.path).run(None, {"input": random_batch(5).numpy()})[0]
    assert out.shape == (5, 3)
    assert sorted(os.listdir(tmp_path / "out")) == ["model.int8-static.onnx", "model.onnx"]


def test_the_calibration_reader_has_equal_batches_a_length_and_ranges():
    images = np.arange(11 * 2, dtype=np.float64).reshape(11, 2)
    reader = calibration_reader(images, "input", 4)
    assert len(reader) == 2  # 11 images in batches of 4: the last 3 are left out
    batches = list(iter(reader.get_next, None))
    assert [b["input"].shape for b in batches] == [(4, 2), (4, 2)] and batches[0]["input"].dtype == np.float32
    reader.set_range(1, 5)
    (only,) = list(iter(reader.get_next, None))
    np.testing.assert_array_equal(only["input"], images[4:8].astype(np.float32))


def _qdq_scales(path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_scale")}


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    model = tiny_model(seed=5)
    set_class_names(model, NAMES)
    report = export_and_check(model, tmp_path_factory.mktemp("calib") / "model.onnx")
    return Path(report.path)


def test_static_calibration_streams_one_batch_at_a_time(fp32_onnx, monkeypatch):
    """Each calibration step sees one batch, so memory holds one batch's activations, not all of them."""
    from onnxruntime.quantization import calibrate

    seen: list[int] = []
    original = calibrate.HistogramCalibrater.collect_data

    def counting(self, reader):
        class Counted:
            def get_next(self_inner):
                item = reader.get_next()
                if item is not None:
                    seen[-1] += 1
                return item
        seen.append(0)
        return original(self, Counted())

    monkeypatch.setattr(calibrate.HistogramCalibrater, "collect_data", counting)
    images = random_batch(20).numpy()
    quantize_static_int8(fp32_onnx, images, StaticConfig(calibration="percentile", batch_size=4))
    assert seen == [1] * 5


def test_streamed_minmax_calibration_equals_calibrating_all_images_at_once(fp32_onnx, tmp_path):
    images = random_batch(24).numpy()
    scales = {}
    for batch in (24, 4):
        copy = tmp_path / f"b{batch}" / "model.onnx"
        copy.parent.mkdir()
        copy.write_bytes(fp32_onnx.read_bytes())
        scales[batch] = _qdq_scales(quantize_static_int8(copy, images, StaticConfig(calibration="minmax", batch_size=batch)))
    assert scales[24].keys() == scales[4].keys() and len(scales[24]) > 0
    for name in scales[24]:
        np.testing.assert_array_equal(scales[24][name], scales[4][name])


def test_static_int8_needs_images(tmp_path, pico_model):
    with pytest.raises(AdaptsoupError, match="calibration images"):
        export_and_check(pico_model, tmp_path / "m.onnx", quantize="static")
    assert not (tmp_path / "m.onnx").exists()


# ----------------------------------------------------------------------------------------------------------------
# The export command's flags


def run_export(capsys, *args) -> tuple[int, str, str]:
    from adaptsoup_cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["export", *[str(a) for a in args]])
    captured = capsys.readouterr()
    return (info.value.code or 0), captured.out, captured.err


@pytest.fixture
def stock(tmp_path) -> Path:
    model = tiny_model(seed=4)
    return save_checkpoint(tmp_path / "stock.safetensors", model.state_dict(), model_meta(model))


@pytest.mark.parametrize("flags, fragment", [
    (["--quantize", "static"], "--images"),
    (["--quantize", "int4"], "int4"),
    (["--quantize", "dynamic", "--calibration", "median"], "--calibration"),
])
def test_export_flag_errors_are_one_line(capsys, tmp_path, flags, fragment):
    code, out, err = run_export(capsys, "--model", tmp_path / "not-read.safetensors", "--onnx", tmp_path / "m.onnx", *flags)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("adaptsoup: error:") and fragment in lines[0]
    assert not (tmp_path / "m.onnx").exists()


def test_export_command_reports_fusions_and_both_int8_models(capsys, tmp_path, stock, image_folder):
    code, out, err = run_export(capsys, "--model", stock, "--onnx", tmp_path / "m.onnx", "--images", image_folder,
                                "--quantize", "dynamic,static", "--calibration", "minmax")
    assert code == 0, err
    text = " ".join(out.split())
    assert "optimised for onnxruntime: 2 Attention, 2 BiasGelu, 5 LayerNormalization" in text
    assert "dynamic int8" in text and "static int8" in text
    assert (tmp_path / "m.int8.onnx").is_file() and (tmp_path / "m.int8-static.onnx").is_file()


def test_export_command_no_optimize(capsys, tmp_path, stock):
    code, out, err = run_export(capsys, "--model", stock, "--onnx", tmp_path / "m.onnx", "--no-optimize")
    assert code == 0, err
    assert "not optimised (--no-optimize)" in " ".join(out.split())
    assert op_counts(tmp_path / "m.onnx")["Attention"] == 0
