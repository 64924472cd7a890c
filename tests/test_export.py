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
from adaptsoup.deploy.onnx import (ParityError, export_and_check, noise_images, plan_checks, preprocess_from_onnx,
                                   read_onnx_metadata, split_for_calibration)
from adaptsoup.deploy.predict import predict_folder
from adaptsoup.deploy.runtime import ort_session
from adaptsoup.core.models import model_meta, set_class_names
from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.deploy.quantize import (CpuFeatures, StaticConfig, calibration_reader, choose_int8_weights, compare_logits,
                                       cpu_features, cpuinfo_flags, quantize_int8, quantize_kinds, quantize_static_int8,
                                       weights_as_uint8)
import adaptsoup.deploy.quantize as quantize_module
from adaptsoup.deploy.onnx_props import read_metadata_props

from helpers import ARCH, CLASS_NAMES, MEAN, STD, logits, random_batch, tiny_model, write_noise_images
import int8_task

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
    # No --images: the checks ran on the 16 noise images, and the figures are those of the two files there.
    assert report.checked_on.source == "noise" and report.checked_on.count == 16 and report.batch_size == 16
    model, _ = exported
    inputs = Preprocess.for_model(model).normalize(noise_images(model)).numpy()
    expected = compare_logits(ort_session(qpath).run(None, {"input": inputs})[0], ort_session(report.path).run(None, {"input": inputs})[0])
    assert report.int8_top1_agreement == expected["top1_agreement"]
    assert report.int8_max_abs_diff == expected["max_abs_diff"]
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
    with torch.no_grad():
        predicted = model(Preprocess.for_model(model).normalize(images.images)).argmax(1)
    assert report.fp32_accuracy == (predicted == images.labels).double().mean().item() * 100
    assert report.checked_on.source == "folder" and report.checked_on.count == len(images) == 5
    assert report.quantized_path is None


def test_parity_error_on_impossible_tolerance(tmp_path, pico_model):
    with pytest.raises(ParityError, match="parity failed on 16 uniform-noise images"):
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
    assert lines[-1].startswith("export checks: 16 uniform-noise images")  # no images given: said after parity
    lines = lines[:-1]
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
    lines = [line for line in lines if not line.startswith("export checks:")]  # the noise images are said too
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


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    """The trained stripes model (tests/int8_task.py) exported with both int8 models, checked on held-out stripes."""
    out = tmp_path_factory.mktemp("trained") / "out" / "model.onnx"
    report = export_and_check(int8_task.trained_model(), out, images=int8_task.labeled_images(), quantize="dynamic,static",
                              log=lambda _: None)
    return report


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_int8_agrees_with_fp32_on_a_trained_model(trained_export, kind):
    """Every logit margin of the fixture is above 6, so int8 must agree with fp32 on every image, and its mean
    logit difference must be the one measured where the int8 products are exact (a saturating CPU moves it
    10-20×). The same on every CPU: the weight format is chosen for it."""
    report = trained_export
    check = {c.kind: c for c in report.quantized}[kind]
    assert report.fp32_accuracy == 100.0
    assert check.top1_agreement == 100.0 and check.accuracy == 100.0
    assert check.mean_abs_diff == pytest.approx(int8_task.REFERENCE_MEAN_ABS_DIFF[kind], rel=0.1)
    assert check.weights == report.int8_weights == choose_int8_weights(cpu_features()).format
    assert read_onnx_metadata(check.path)["class_names"] == int8_task.CLASS_NAMES
    assert read_metadata_props(check.path)["adaptsoup.int8_weights"] == check.weights


def test_static_int8_is_qdq(trained_export):
    check = trained_export.quantized[1]
    assert check.kind == "static" and Path(check.path).name == "model.int8-static.onnx"
    assert trained_export.quantized_path.endswith("model.int8.onnx")  # the legacy fields describe the dynamic model
    ops = op_counts(check.path)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert check.size_bytes == Path(check.path).stat().st_size
    out = ort_session(check.path).run(None, {"input": random_batch(5).numpy()})[0]
    assert out.shape == (5, 3)
    assert sorted(os.listdir(Path(check.path).parent)) == ["model.int8-static.onnx", "model.int8.onnx", "model.onnx"]


def test_the_checks_never_see_a_calibration_image(trained_export):
    """96 stripes, 32 per class: 16 of each calibrate, the other 48 are what agreement and accuracy are measured on."""
    checked = trained_export.checked_on
    assert (checked.source, checked.count, checked.calibration_count, checked.folder) == ("split", 48, 48, "stripes")
    assert checked.by_class and "held out from calibration (seeded class-balanced split, seed 0" in checked.describe()


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
# The int8 weight format for this CPU (tests/test_int8_cpu.py runs the AVX2 kernels themselves)


@pytest.mark.parametrize("machine, vnni, requested, expected", [
    ("x86_64", True, "auto", "s8"),  # VNNI: u8×s8 products summed in 32 bits
    ("x86_64", False, "auto", "u8"),  # AVX2 without VNNI: vpmaddubsw's 16-bit pair sums saturate
    ("amd64", None, "auto", "u8"),  # not known: the format that is exact everywhere
    ("aarch64", False, "auto", "s8"),
    ("arm64", None, "auto", "s8"),
    ("x86_64", True, "u8", "u8"),
    ("x86_64", False, "s7", "s7"),
    ("x86_64", False, "s8", "s8"),
])
def test_choose_int8_weights(machine, vnni, requested, expected):
    chosen = choose_int8_weights(CpuFeatures(machine, vnni, "test"), requested)
    assert chosen.format == expected
    if requested == "auto" and expected == "u8":
        assert "VNNI" in chosen.reason and "saturat" in chosen.reason and "(test)" in chosen.reason
    if requested == "s8" and not vnni:
        assert "may lack VNNI" in chosen.reason


def test_choose_int8_weights_refuses_unknown_formats():
    with pytest.raises(AdaptsoupError, match="int8 weight format"):
        choose_int8_weights(CpuFeatures("x86_64", True, "test"), "s4")


def test_cpu_features_fall_back_to_proc_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # as on an older torch
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx_vnni\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpuinfo_flags(cpuinfo.read_text()) == {"fpu", "sse", "avx2", "avx_vnni"}
    assert cpu_features(cpuinfo).vnni is True and cpu_features(cpuinfo).source == str(cpuinfo)
    cpuinfo.write_text("flags : fpu avx2 avx512f\n")
    assert cpu_features(cpuinfo).vnni is False
    assert cpu_features(tmp_path / "missing").vnni is None


def test_cpu_features_read_cpuid_through_torch(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_vnni": False, "avx_vnni": True})
    assert cpu_features().vnni is True and cpu_features().source == "CPUID"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    assert cpu_features().vnni is False


def _int8_arrays(proto) -> dict[str, np.ndarray]:
    from onnx import TensorProto, numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.UINT8)}


@pytest.fixture(scope="module")
def int8_by_format(trained_export, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """The trained model's dynamic and static int8 files with s8 and with s7 weights, whatever this CPU is."""
    calibration = Preprocess.for_model(int8_task.trained_model()).normalize(int8_task.labeled_images().images).numpy()
    files = {}
    for fmt in ("s8", "s7"):
        fp32 = tmp_path_factory.mktemp(fmt) / "model.onnx"
        fp32.write_bytes(Path(trained_export.path).read_bytes())
        files[fmt] = {"dynamic": quantize_int8(fp32, fmt), "static": quantize_static_int8(fp32, calibration, weights=fmt)}
    return files


@pytest.mark.parametrize("kind, ops, weights", [("static", {"DequantizeLinear"}, 7), ("dynamic", {"MatMulInteger", "QAttention"}, 9)])
def test_u8_weights_keep_every_product(int8_by_format, kind, ops, weights):
    """Rewriting an s8 file's weights as u8 moves each weight and its zero point by 128, exactly, and leaves no int8
    weight matrix (7 in the static file: 6 MatMul and the head; 9 in the dynamic one: 7 MatMulInteger, 2 QAttention)."""
    import onnx

    before = onnx.load(str(int8_by_format["s8"][kind]))
    after = onnx.load(str(int8_by_format["s8"][kind]))
    assert weights_as_uint8(after) == weights
    old, new = _int8_arrays(before), _int8_arrays(after)
    rewritten = 0
    for node_before, node_after in zip(before.graph.node, after.graph.node):
        if node_before.op_type not in ops or node_before.input[quantize_module.WEIGHT_SLOTS[node_before.op_type][0]] not in old:
            continue  # not a weight (an activation's DequantizeLinear)
        w, z = quantize_module.WEIGHT_SLOTS[node_before.op_type]
        assert new[node_after.input[w]].dtype == np.uint8 and new[node_after.input[z]].dtype == np.uint8
        for slot in (w, z):  # both moved by 128, so weight - zero point (per tensor or per channel) is unchanged
            np.testing.assert_array_equal(new[node_after.input[slot]].astype(np.int32), old[node_before.input[slot]].astype(np.int32) + 128)
        rewritten += 1
    assert rewritten == weights
    assert not any(a.ndim >= 2 and a.dtype == np.int8 for a in new.values())
    assert set(new) <= {name for node in after.graph.node for name in node.input}  # the replaced int8 tensors are gone


def test_u8_weights_need_a_zero_point():
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 2), dtype=np.int8), "w")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 2])], initializer=[weight])
    with pytest.raises(AdaptsoupError, match="no zero point"):
        weights_as_uint8(helper.make_model(graph))


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_s7_weights_cannot_saturate_16_bits(int8_by_format, kind):
    """7-bit weights: a pair of u8×s7 products is at most 2 × 255 × 64 = 32,640, inside int16's 32,767."""
    import onnx

    arrays = _int8_arrays(onnx.load(str(int8_by_format["s7"][kind])))
    matrices = [a for a in arrays.values() if a.ndim >= 2]
    assert len(matrices) == (9 if kind == "dynamic" else 7)
    assert max(int(np.abs(a.astype(np.int32)).max()) for a in matrices) == 64
    assert 2 * 255 * 64 <= 32767


@pytest.mark.parametrize("vnni, expected", [(False, "u8"), (True, "s8")])
def test_export_records_the_weight_format_chosen_for_the_cpu(tmp_path, monkeypatch, vnni, expected):
    """Both branches on any machine: the CPU's features are what export is told they are."""
    import adaptsoup.deploy.onnx as onnx_module
    import onnx

    monkeypatch.setattr(onnx_module, "cpu_features", lambda: CpuFeatures("x86_64", vnni, "monkeypatched"))
    kinds = "dynamic,static" if expected == "u8" else "dynamic"
    report = export_and_check(int8_task.trained_model(), tmp_path / "m.onnx", images=int8_task.labeled_images(),
                              quantize=kinds, log=lambda _: None)
    assert report.int8_weights == expected and "(monkeypatched)" in report.int8_weights_reason
    for check in report.quantized:
        assert check.weights == expected and read_metadata_props(check.path)["adaptsoup.int8_weights"] == expected
        matrices = [a for a in _int8_arrays(onnx.load(check.path)).values() if a.ndim >= 2]
        assert {a.dtype for a in matrices} == {np.dtype(np.uint8 if expected == "u8" else np.int8)}
        if expected == "u8":  # exact on every CPU: the reference figures hold here whatever this machine is
            assert check.top1_agreement == 100.0
            assert check.mean_abs_diff == pytest.approx(int8_task.REFERENCE_MEAN_ABS_DIFF[check.kind], rel=0.1)


# ----------------------------------------------------------------------------------------------------------------
# What the checks are measured on: never on calibration images, and said plainly when on noise


def test_split_for_calibration_is_disjoint_seeded_and_class_balanced():
    labels = np.repeat([0, 1, 2], 10)
    calib, check = split_for_calibration(labels, 30, 512)
    assert len(calib) == 15 and len(check) == 15  # at most half of each class calibrates
    assert set(calib).isdisjoint(check) and set(calib) | set(check) == set(range(30))
    assert Counter(labels[calib].tolist()) == Counter(labels[check].tolist()) == {0: 5, 1: 5, 2: 5}
    assert labels[calib[:3]].tolist() == [0, 1, 2]  # the classes in turn, so every calibration batch mixes them
    np.testing.assert_array_equal(split_for_calibration(labels, 30, 512)[0], calib)  # seeded
    assert split_for_calibration(labels, 30, 512, seed=1)[0].tolist() != calib.tolist()
    small, _ = split_for_calibration(labels, 30, 6)
    assert Counter(labels[small].tolist()) == {0: 2, 1: 2, 2: 2}


def test_split_for_calibration_leaves_every_class_at_least_half():
    labels = np.array([0] * 20 + [1] * 4 + [2] * 1)
    calib, check = split_for_calibration(labels, 25, 512)
    assert Counter(labels[calib].tolist()) == {0: 10, 1: 2}
    assert Counter(labels[check].tolist()) == {0: 10, 1: 2, 2: 1}
    unlabeled, rest = split_for_calibration(None, 9, 512)
    assert len(unlabeled) == 4 and len(rest) == 5 and set(unlabeled).isdisjoint(rest)


def test_plan_checks(tmp_path):
    images, calibration = int8_task.labeled_images(12), int8_task.labeled_images(10, seed=8)
    check, calib, said = plan_checks(images, None, static=False, max_calibration=512)
    assert check is images and calib is None and (said.source, said.count, said.calibration_folder) == ("folder", 12, None)
    check, calib, said = plan_checks(images, calibration, static=True, max_calibration=4)
    assert check is images and len(calib) == 4 and set(calib.paths) <= set(calibration.paths)  # a seeded 4 of 10
    assert (said.source, said.calibration_count) == ("folder", 4) and "calibrated on 4 images of stripes" in said.describe()
    check, calib, said = plan_checks(None, None, static=False, max_calibration=512)
    assert check is None and said.source == "noise" and said.count == 16 and "uniform-noise" in said.describe()
    with pytest.raises(AdaptsoupError, match="too few"):
        plan_checks(int8_task.labeled_images(3), None, static=True, max_calibration=512)  # one image per class


def _spy_on_calibration(monkeypatch) -> list[np.ndarray]:
    seen: list[np.ndarray] = []
    real = quantize_module.quantize_static_int8

    def spy(path, images, config=StaticConfig(), weights="auto"):
        seen.append(np.array(images))
        return real(path, images, config, weights)

    monkeypatch.setattr(quantize_module, "quantize_static_int8", spy)
    return seen


def test_static_int8_calibrates_on_the_calibration_images_and_checks_on_the_others(tmp_path, monkeypatch):
    model, images = int8_task.trained_model(), int8_task.labeled_images(24)
    seen = _spy_on_calibration(monkeypatch)
    report = export_and_check(model, tmp_path / "split" / "m.onnx", images=images, quantize="static", log=lambda _: None)
    calib_idx, check_idx = split_for_calibration(images.labels.numpy(), 24, 512)
    normalize = Preprocess.for_model(model).normalize
    np.testing.assert_array_equal(seen[0], normalize(images.images[calib_idx]).numpy())
    assert (report.checked_on.count, report.checked_on.calibration_count, report.batch_size) == (len(check_idx), 12, 12)

    calibration = int8_task.labeled_images(10, seed=8)
    report = export_and_check(model, tmp_path / "folder" / "m.onnx", images=images, calibration=calibration,
                              quantize="static", log=lambda _: None)
    np.testing.assert_array_equal(seen[1], normalize(calibration.images).numpy())
    assert (report.checked_on.source, report.checked_on.count, report.checked_on.calibration_count) == ("folder", 24, 10)


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
    (["--quantize", "static"], "--calibration FOLDER or --images FOLDER"),
    (["--quantize", "int4"], "int4"),
    (["--quantize", "dynamic", "--calibration-method", "median"], "--calibration-method"),
    (["--quantize", "static", "--calibration", "minmax"], "the range estimator is --calibration-method minmax"),
    (["--quantize", "dynamic", "--calibration", "somewhere"], "--calibration is for static int8"),
    (["--quantize", "dynamic", "--int8-weights", "s4"], "--int8-weights"),
])
def test_export_flag_errors_are_one_line(capsys, tmp_path, flags, fragment):
    code, out, err = run_export(capsys, "--model", tmp_path / "not-read.safetensors", "--onnx", tmp_path / "m.onnx", *flags)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("adaptsoup: error:") and fragment in lines[0]
    assert not (tmp_path / "m.onnx").exists()


def test_export_command_reports_fusions_and_both_int8_models(capsys, tmp_path, stock, image_folder):
    code, out, err = run_export(capsys, "--model", stock, "--onnx", tmp_path / "m.onnx", "--images", image_folder,
                                "--quantize", "dynamic,static", "--calibration-method", "minmax", "--int8-weights", "s7")
    assert code == 0, err
    text = " ".join(out.split())
    assert "optimised for onnxruntime: 2 Attention, 2 BiasGelu, 5 LayerNormalization" in text
    assert "dynamic int8" in text and "static int8" in text
    assert f"checked on 6 images of {image_folder} held out from calibration (seeded split, seed 0; the other 6" in text
    assert "int8 weights: s7 (asked for)" in text
    assert (tmp_path / "m.int8.onnx").is_file() and (tmp_path / "m.int8-static.onnx").is_file()


def test_export_command_no_optimize(capsys, tmp_path, stock):
    code, out, err = run_export(capsys, "--model", stock, "--onnx", tmp_path / "m.onnx", "--no-optimize")
    assert code == 0, err
    assert "not optimised (--no-optimize)" in " ".join(out.split())
    assert op_counts(tmp_path / "m.onnx")["Attention"] == 0


def test_export_command_says_when_it_checked_on_noise(capsys, tmp_path, stock):
    code, out, err = run_export(capsys, "--model", stock, "--onnx", tmp_path / "m.onnx", "--quantize", "dynamic")
    assert code == 0, err
    assert "checked on 16 uniform-noise images (no --images given)" in " ".join(out.split())
    assert "export checks: 16 uniform-noise images" in " ".join(err.split())


def test_export_command_calibrates_on_the_calibration_folder(capsys, tmp_path, stock, image_folder, monkeypatch):
    calibration = tmp_path / "calibration"
    write_noise_images(calibration, 9, seed=40)
    seen = _spy_on_calibration(monkeypatch)
    code, out, err = run_export(capsys, "--model", stock, "--onnx", tmp_path / "m.onnx", "--images", image_folder,
                                "--calibration", calibration, "--quantize", "static")
    assert code == 0, err
    text = " ".join(out.split())
    assert f"checked on all 12 images of {image_folder}; static int8 calibrated on 9 images of {calibration}" in text
    expected = load_folder(calibration, Preprocess.for_model(tiny_model(seed=4)), cache=False)
    np.testing.assert_array_equal(seen[0], Preprocess.for_model(tiny_model(seed=4)).normalize(expected.images).numpy())
