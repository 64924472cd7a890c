"""``predict`` (issue #16): metadata read without an onnxruntime session, one session per run, the folder
streamed in batches decoded ahead (a bounded number of them), and the CSV written whole or not at all."""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from adaptsoup.core.data import Preprocess, load_folder
from adaptsoup.core.io import write_atomic
from adaptsoup.core.prefetch import DecodeAhead
from adaptsoup.core.models import set_class_names
from adaptsoup.deploy.onnx import export_onnx
from adaptsoup.deploy.onnx_props import read_metadata_props
from adaptsoup.deploy.predict import predict_folder, softmax
from adaptsoup.deploy.runtime import onnx_logits, ort_session, read_onnx_metadata
from adaptsoup.errors import AdaptsoupError

from helpers import MESSY_BAD, MESSY_GOOD, build_messy_folder, tiny_model, write_noise_images

NAMES = ["airplane", "boat", "car"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    model = tiny_model(seed=3)
    set_class_names(model, NAMES)
    return export_onnx(model, tmp_path_factory.mktemp("predict") / "model.onnx", log=lambda _: None).path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Readable images of several sizes and formats (nested), unreadable files, a non-image and an ignored file."""
    root = build_messy_folder(tmp_path_factory.mktemp("folder") / "images")
    write_noise_images(root / "noise", 11, seed=2)
    write_noise_images(root / "big", 3, seed=3, size=(90, 60), suffix=".jpg")
    (root / "notes.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    return root


def predict_in_memory(onnx_path: Path, images_dir: Path, csv_path: Path, batch_size: int = 256):
    """The implementation ``predict_folder`` replaced (decode the whole folder, then run it): the reference."""
    meta = read_onnx_metadata(onnx_path)
    pre = Preprocess.from_meta(meta)
    images = load_folder(images_dir, pre, cache=False)
    probs = softmax(onnx_logits(ort_session(onnx_path), pre.normalize(images.images).numpy(), batch_size))
    names = meta["class_names"] or [str(i) for i in range(probs.shape[1])]
    top = probs.argmax(1)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "class", "probability"])
            for rel, k, p in zip(images.paths, top, probs[np.arange(len(top)), top]):
                writer.writerow([rel, names[int(k)], f"{float(p):.6f}"])

    write_atomic(csv_path, write)
    return images


# ----------------------------------------------------------------------------------------------------------------
# The CSV


@pytest.mark.parametrize("batch_size, threads", [(1, 1), (4, 1), (64, 2)])
def test_streamed_csv_is_the_in_memory_csv(model_path, folder, tmp_path, batch_size, threads):
    images = predict_in_memory(model_path, folder, tmp_path / "reference.csv")
    report = predict_folder(model_path, folder, tmp_path / "streamed.csv", batch_size=batch_size, threads=threads)

    assert (tmp_path / "streamed.csv").read_bytes() == (tmp_path / "reference.csv").read_bytes()
    assert report.images == len(images) == len(MESSY_GOOD) + 14
    assert report.skipped == images.skipped
    skipped = {Path(p).name for p, _ in report.skipped}
    assert skipped == {Path(p).name for p in MESSY_BAD} | {"notes.svg"}
    assert (report.threads, report.batch_size) == (threads, batch_size) and report.seconds > 0


def test_a_folder_with_no_readable_image_is_an_error_and_writes_nothing(model_path, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(AdaptsoupError, match="none of the 1 image files"):
        predict_folder(model_path, tmp_path / "bad", tmp_path / "p.csv")
    assert os.listdir(tmp_path) == ["bad"]


# ----------------------------------------------------------------------------------------------------------------
# One session; metadata without one


class CountingSessions:
    """Stands in for ``onnxruntime.InferenceSession``: counts the sessions made; ``fail_on_run`` makes the
    session's n-th ``run`` raise ``error``."""

    def __init__(self, real, fail_on_run: int | None = None, error: BaseException | None = None) -> None:
        self.real, self.fail_on_run, self.error = real, fail_on_run, error
        self.created, self.runs = 0, 0

    def __call__(self, *args, **kwargs):
        self.created += 1
        session, counter = self.real(*args, **kwargs), self

        class Session:
            def __getattr__(self, name):
                return getattr(session, name)

            def run(self, *run_args, **run_kwargs):
                counter.runs += 1
                if counter.runs == counter.fail_on_run:
                    raise counter.error
                return session.run(*run_args, **run_kwargs)

        return Session()


def test_predict_opens_exactly_one_session(model_path, folder, tmp_path, monkeypatch):
    import onnxruntime

    sessions = CountingSessions(onnxruntime.InferenceSession)
    monkeypatch.setattr(onnxruntime, "InferenceSession", sessions)
    read_onnx_metadata(model_path)
    assert sessions.created == 0
    predict_folder(model_path, folder, tmp_path / "p.csv", batch_size=4)
    assert sessions.created == 1
    assert sessions.runs > 1  # the folder went through in batches


def test_metadata_props_are_what_onnxruntime_reads(model_path):
    props = read_metadata_props(model_path)
    assert props == dict(ort_session(model_path).get_modelmeta().custom_metadata_map)
    assert props["adaptsoup.class_names"] == '["airplane", "boat", "car"]'


def _assert_one_line_error(path: Path, fragment: str) -> None:
    with pytest.raises(AdaptsoupError) as info:
        read_onnx_metadata(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and fragment in message, message


@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.5, 0.9, 0.999])
def test_truncated_models_are_one_line_errors(model_path, tmp_path, fraction):
    data = model_path.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    _assert_one_line_error(path, "truncated")


@pytest.mark.parametrize("content, fragment", [
    (b"", "empty file"),
    (b"\x08\x08" + bytes(range(256)) * 8, "garbage"),  # a plausible first field, then nonsense
    (b"\x08\x08", "no ir_version or no graph"),  # an ir_version alone
    (b"\x3a\x05abc", "a field of 5 bytes where 3 are left"),  # a graph longer than the file
    (b"\x08", "ends inside a field"),
    (b"\x08\x08\x3a\x00\x72\x04\x0a\x02\xff\xfe", "not UTF-8"),  # a metadata key that is not text
])
def test_not_onnx_files_are_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    _assert_one_line_error(path, fragment)


def test_an_onnx_model_without_adaptsoup_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.onnx"
    path.write_bytes(b"\x08\x08\x3a\x00\x72\x08\x0a\x01k\x12\x03v v")  # ir_version, an empty graph, {"k": "v v"}
    assert read_metadata_props(path) == {"k": "v v"}
    _assert_one_line_error(path, "not exported by adaptsoup")


# ----------------------------------------------------------------------------------------------------------------
# Streaming: bounded decode-ahead, nothing half-written


def test_predict_decodes_at_most_a_few_batches_ahead(model_path, folder, tmp_path, monkeypatch):
    import adaptsoup.deploy.predict as predict_module

    made: list[DecodeAhead] = []

    class Recorded(DecodeAhead):
        def __enter__(self):
            made.append(self)
            return super().__enter__()

    monkeypatch.setattr(predict_module, "DecodeAhead", Recorded)
    predict_folder(model_path, folder, tmp_path / "p.csv", batch_size=2, threads=1)
    (batches,) = made
    assert len(batches.chunks) >= 3 * batches.ahead  # a folder of many batches ...
    assert 1 <= batches.most_ahead <= batches.ahead  # ... never more than `ahead` of them decoded beyond the caller's


def test_decode_ahead_fills_its_bound_and_never_passes_it(folder, monkeypatch):
    """While the caller holds a batch, the threads decode exactly ``ahead`` more, and no more."""
    import adaptsoup.core.prefetch as prefetch

    monkeypatch.setattr(prefetch, "decode_image", lambda path, pre: np.zeros((32, 32, 3), np.uint8))
    pre = Preprocess((32, 32), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    paths = [folder / f"{i}.png" for i in range(40)]
    with DecodeAhead(paths, pre, batch_size=2, workers=2, ahead=3) as batches:
        for k, batch in enumerate(batches):
            assert batch.files == 2 and batch.inputs.shape == (2, 3, 32, 32)
            if k == 0:  # the caller is slow: the threads have time to run ahead
                deadline = time.monotonic() + 10
                while batches.most_ahead < 3 and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.05)
    assert k == 19
    assert batches.most_ahead == 3


@pytest.mark.parametrize("error", [RuntimeError("onnxruntime failed"), KeyboardInterrupt()])
def test_a_failure_mid_run_leaves_nothing_at_the_destination(model_path, folder, tmp_path, monkeypatch, error):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "InferenceSession", CountingSessions(onnxruntime.InferenceSession, fail_on_run=3, error=error))
    out = tmp_path / "out"
    with pytest.raises(type(error)):
        predict_folder(model_path, folder, out / "p.csv", batch_size=2)
    assert not out.exists() or os.listdir(out) == []  # neither the CSV nor a temporary file
    assert not [t for t in threading.enumerate() if t.name.startswith("adaptsoup-decode")]  # the decoding stopped


def test_a_failure_keeps_the_previous_csv(model_path, folder, tmp_path, monkeypatch):
    import onnxruntime

    (tmp_path / "p.csv").write_text("the previous run's predictions\n")
    monkeypatch.setattr(onnxruntime, "InferenceSession", CountingSessions(onnxruntime.InferenceSession, fail_on_run=2, error=RuntimeError("x")))
    with pytest.raises(RuntimeError):
        predict_folder(model_path, folder, tmp_path / "p.csv", batch_size=2)
    assert (tmp_path / "p.csv").read_text() == "the previous run's predictions\n"
    assert sorted(os.listdir(tmp_path)) == ["p.csv"]


def test_ctrl_c_in_the_command_exits_130_and_writes_nothing(model_path, folder, tmp_path, monkeypatch, capsys):
    import onnxruntime
    from adaptsoup_cli.main import main

    monkeypatch.setattr(onnxruntime, "InferenceSession", CountingSessions(onnxruntime.InferenceSession, fail_on_run=2, error=KeyboardInterrupt()))
    with pytest.raises(SystemExit) as info:
        main(["predict", "--onnx", str(model_path), str(folder), "--csv", str(tmp_path / "p.csv"), "--batch-size", "2", "--no-progress"])
    assert info.value.code == 130  # (Typer turns Ctrl-C into exit 130)
    assert "Traceback" not in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_the_command_defaults_to_the_library_batch_size():
    import inspect

    from adaptsoup.deploy.predict import DEFAULT_BATCH_SIZE
    from adaptsoup_cli.deploy import predict

    assert inspect.signature(predict).parameters["batch_size"].default.default == DEFAULT_BATCH_SIZE


def test_the_throughput_benchmark_compares_predict_with_raw_onnxruntime(model_path, folder):
    from adaptsoup_bench.predict_speed import markdown, predict_vs_raw

    row = predict_vs_raw(model_path, folder, batch_size=4, threads=1, rounds=3)
    assert row["images"] == len(MESSY_GOOD) + 14 and row["skipped"] == len(MESSY_BAD) + 1
    assert row["rounds"] == 3 and len(row["predict_rounds_images_per_s"]) == 3
    assert row["predict_images_per_s"] == pytest.approx(sorted(row["predict_rounds_images_per_s"])[1], abs=0.051)
    assert row["ratio"] == pytest.approx(row["predict_images_per_s"] / row["raw_images_per_s"], rel=0.01)
    assert 0 < row["first_ratio"] and row["decode_us_per_image"] > 0
    assert row["one_core_ceiling"] == pytest.approx(1 / (1 + row["raw_images_per_s"] * row["decode_us_per_image"] * 1e-6), abs=2e-3)
    assert row["raw_images_per_s"] == max(row["raw_spin_images_per_s"], row["raw_no_spin_images_per_s"])
    assert row["predict_memory"]["rss_peak_mb"] > 0
    text = markdown({"command": "c", "commit": "abc", "source_dirty": False, "machine": {"cpu": "CPU", "cpu_count": 2},
                     "threads": 1, "model": "m", "batch_size": 4, "wall_time_s": 1.0, "notes": [], "rows": [row]})
    assert text.startswith("Command: `c`") and "CPU (2 cores" in text and f"| {row['images']} |" in text
