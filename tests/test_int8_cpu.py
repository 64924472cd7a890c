"""int8 on a CPU without AVX-512 and VNNI, on whatever x86 Linux machine runs the tests (issue #22).

onnxruntime cannot be told to use a lower instruction set, so a child Python runs with those features
hidden from CPUID (``tests/fixtures/cpuid_mask.c``, which needs a kernel and CPU that can make CPUID fault):
onnxruntime and torch then choose their AVX2 kernels, as on an AVX2-only EPYC. Where the mask cannot be
built or loaded, the tests are skipped and say why.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import int8_task
from adaptsoup.core.data import Preprocess
from adaptsoup.deploy.onnx import export_onnx
from adaptsoup.deploy.quantize import cpu_features, quantize_int8, quantize_static_int8
from adaptsoup.deploy.runtime import onnx_logits, ort_session

pytestmark = pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                                reason="CPUID faulting is an x86-64 Linux feature")

MASK_SOURCE = Path(__file__).parent / "fixtures" / "cpuid_mask.c"
TESTS = Path(__file__).parent

# Run under the mask: the export of the trained fixture as `make test` runs it, then the given int8 files.
CHILD = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import int8_task
from adaptsoup.deploy.onnx import export_and_check
from adaptsoup.deploy.quantize import cpu_features
from adaptsoup.deploy.runtime import onnx_logits, ort_session

folder, files = sys.argv[2], sys.argv[3:]
report = export_and_check(int8_task.trained_model(), folder + "/masked/model.onnx", images=int8_task.labeled_images(),
                          quantize="dynamic,static", log=lambda _: None)
inputs = np.load(folder + "/inputs.npy")
np.savez(folder + "/masked.npz", **{name: onnx_logits(ort_session(name), inputs) for name in files})
print(json.dumps({"vnni": cpu_features().vnni, "weights": report.int8_weights,
                  "checks": {c.kind: [c.top1_agreement, c.mean_abs_diff] for c in report.quantized}}))
"""


@pytest.fixture(scope="module")
def masked_env(tmp_path_factory) -> dict[str, str]:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the CPUID mask")
    library = tmp_path_factory.mktemp("mask") / "libcpuidmask.so"
    # The compiler, and Python with faulthandler on, catch SIGSEGV themselves: neither may meet the mask.
    plain = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", "PYTHONFAULTHANDLER")}
    built = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(MASK_SOURCE)], env=plain,
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip("cannot build the CPUID mask: " + (built.stderr.strip().splitlines() or ["?"])[-1])
    env = dict(plain, LD_PRELOAD=str(library))
    probe = subprocess.run([sys.executable, "-c", "print(1)"], env=env, capture_output=True, text=True)
    if probe.returncode == 97:
        pytest.skip("this CPU or kernel cannot make CPUID fault: " + probe.stderr.strip())
    assert probe.returncode == 0, probe.stderr
    return env


def test_without_vnni_export_writes_u8_weights_that_give_the_exact_products(masked_env, tmp_path):
    model = int8_task.trained_model()
    fp32 = export_onnx(model, tmp_path / "model.onnx", log=lambda _: None).path
    images = int8_task.labeled_images()
    inputs = Preprocess.for_model(model).normalize(images.images).numpy()
    np.save(tmp_path / "inputs.npy", inputs)
    files = {}
    for fmt in ("s8", "u8"):  # made here, run here and under the mask
        copy = tmp_path / fmt / "model.onnx"
        copy.parent.mkdir()
        shutil.copy(fp32, copy)
        files[fmt, "dynamic"] = str(quantize_int8(copy, fmt))
        files[fmt, "static"] = str(quantize_static_int8(copy, inputs, weights=fmt))
    here = {key: onnx_logits(ort_session(path), inputs) for key, path in files.items()}

    child = subprocess.run([sys.executable, "-c", CHILD, str(TESTS), str(tmp_path), *files.values()], env=masked_env,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    masked = {key: np.load(tmp_path / "masked.npz")[path] for key, path in files.items()}

    # The child saw no VNNI (torch reads CPUID as onnxruntime does) and so chose u8 weights, whose products
    # are exact: the figures are the reference ones, measured where s8 is exact.
    assert result["vnni"] is False and result["weights"] == "u8"
    for kind, (agreement, mean_abs_diff) in result["checks"].items():
        assert agreement == 100.0
        assert mean_abs_diff == pytest.approx(int8_task.REFERENCE_MEAN_ABS_DIFF[kind], rel=0.1)
    for kind in ("dynamic", "static"):
        np.testing.assert_allclose(masked["u8", kind], here["u8", kind], atol=1e-5, rtol=0)  # the same on both kernels
        if cpu_features().vnni:  # here s8 is exact too: u8 gives its products, and the AVX2 kernels do not
            np.testing.assert_allclose(here["u8", kind], here["s8", kind], atol=1e-5, rtol=0)
            assert np.abs(masked["s8", kind] - here["s8", kind]).mean() > 0.02  # saturated (measured: 0.1 and 0.15)
