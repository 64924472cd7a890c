"""The ``adaptsoup`` command line: help for every command, one-line errors with exit code 2, export + predict."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
import typer

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.core.models import model_meta
from adaptsoup_cli.main import app, main

from helpers import ARCH, CLASS_NAMES, tiny_model


def _command_paths(command: click.Command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every (sub)command path of the Typer app, so newly added commands are covered automatically."""
    paths = []
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        paths.append(prefix + (name,))
        paths.extend(_command_paths(sub, prefix + (name,)))
    return paths


COMMANDS = _command_paths(typer.main.get_command(app))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Call the console-script entry point in this process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    code = info.value.code
    return (0 if code is None else code), captured.out, captured.err


def run_subprocess(*args, executable: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (executable or [sys.executable, "-m", "adaptsoup_cli.main"]) + [str(a) for a in args]
    env = dict(os.environ, COLUMNS="200", PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def squeeze(text: str) -> str:
    """``text`` without whitespace: rich wraps stdout at the console width when it is not a terminal."""
    return "".join(text.split())


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("adaptsoup: error:"), lines[0]
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    model = tiny_model(seed=4)
    return save_checkpoint(tmp_path / "stock.safetensors", model.state_dict(), model_meta(model, trained_by="tests"))


# ----------------------------------------------------------------------------------------------------------------
# Help and usage errors


def test_commands_are_registered():
    names = {path[0] for path in COMMANDS}
    assert {"info", "export", "predict"} <= names


def test_top_level_help(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for path in COMMANDS:
        if len(path) == 1:
            assert path[0] in out


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_every_command_has_help(capsys, command):
    code, out, err = run_cli(capsys, *command, "--help")
    assert code == 0, err
    assert "Usage" in out
    assert command[-1] in out


@pytest.mark.parametrize("command", [()] + COMMANDS, ids=["(top)"] + [" ".join(p) for p in COMMANDS])
def test_unknown_option_is_a_one_line_usage_error(capsys, command):
    code, _, err = run_cli(capsys, *command, "--definitely-not-an-option")
    assert code == 2
    assert_one_line_error(err, "--definitely-not-an-option")


def test_no_arguments_shows_help(capsys):
    code, out, err = run_cli(capsys)
    assert code == 2
    assert "Usage" in out + err


def test_unknown_command(capsys):
    code, _, err = run_cli(capsys, "definitely-not-a-command")
    assert code == 2
    assert_one_line_error(err)


def test_unknown_option_in_a_real_process():
    script = Path(sys.executable).parent / "adaptsoup"
    executable = [str(script)] if script.is_file() else None  # the installed console script, when present
    result = run_subprocess("export", "--bogus-flag", executable=executable)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--bogus-flag")


def test_missing_checkpoint_in_a_real_process(tmp_path):
    missing = tmp_path / "missing.safetensors"
    result = run_subprocess("export", "--model", missing, "--onnx", tmp_path / "out.onnx")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, str(missing))
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("command", ["export", "info"])
def test_missing_checkpoint_is_one_line(capsys, tmp_path, command):
    missing = tmp_path / "nowhere" / "model.safetensors"
    args = ["export", "--model", missing, "--onnx", tmp_path / "out.onnx"] if command == "export" else ["info", missing]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert_one_line_error(err, "not found", str(missing))


def test_missing_onnx_and_image_folder_are_one_line(capsys, tmp_path, image_folder):
    code, _, err = run_cli(capsys, "predict", "--onnx", tmp_path / "missing.onnx", image_folder)
    assert code == 2
    assert_one_line_error(err, "missing.onnx")
    code, _, err = run_cli(capsys, "info", tmp_path / "missing.onnx")
    assert code == 2
    assert_one_line_error(err, "missing.onnx")


@pytest.mark.parametrize("folder", ["photos [old]", "run[/b]"])
def test_error_message_keeps_brackets_in_paths(capsys, tmp_path, folder):
    missing = tmp_path / folder / "model.safetensors"
    code, _, err = run_cli(capsys, "info", missing)
    assert code == 2
    assert_one_line_error(err, str(missing))


# ----------------------------------------------------------------------------------------------------------------
# End to end


def test_export_then_predict(capsys, tmp_path, checkpoint, image_folder):
    (image_folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff")
    onnx_path = tmp_path / "deploy" / "model.onnx"

    code, out, err = run_cli(
        capsys, "export", "--model", checkpoint, "--onnx", onnx_path, "--images", image_folder, "--quantize", "int8"
    )
    assert code == 0, err
    assert onnx_path.is_file()
    assert (onnx_path.parent / "model.int8.onnx").is_file()
    assert "wrote" in out and "parity" in out
    assert str(onnx_path) in squeeze(out)

    code, out, err = run_cli(capsys, "info", onnx_path)
    assert code == 0, err
    assert ARCH in out
    for name in CLASS_NAMES:
        assert name in out

    csv_path = tmp_path / "preds" / "predictions.csv"
    code, out, err = run_cli(capsys, "predict", "--onnx", onnx_path, image_folder, "--csv", csv_path, "--batch-size", "5", "--threads", "1")
    assert code == 0, err
    assert "12images,1skipped" in squeeze(out) and "images/s" in out and "(1thread,batch5)" in squeeze(out)
    assert "corrupt.jpg" in squeeze(err)  # the unreadable file is reported, not fatal
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "class", "probability"]
    assert len(rows) == 13
    assert {row[1] for row in rows[1:]} <= set(CLASS_NAMES)
    assert all(0.0 < float(row[2]) <= 1.0 for row in rows[1:])


def test_info_on_a_checkpoint(capsys, checkpoint):
    code, out, err = run_cli(capsys, "info", checkpoint)
    assert code == 0, err
    assert ARCH in out
    assert "trained_by" in out


def test_export_parity_failure_exits_1(capsys, tmp_path):
    """A plain .pt state dict (so --arch is needed) and an impossible tolerance."""
    model = tiny_model(seed=6)
    pt = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, pt)

    code, _, err = run_cli(capsys, "export", "--model", pt, "--onnx", tmp_path / "m.onnx")
    assert code == 2
    assert_one_line_error(err, "--arch")

    code, _, err = run_cli(capsys, "export", "--model", pt, "--arch", ARCH, "--onnx", tmp_path / "m.onnx", "--tolerance", "-1")
    assert code == 1
    assert_one_line_error(err, "parity")


def test_relative_checkpoint_path(capsys, tmp_path, checkpoint, monkeypatch):
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(checkpoint, work / "ck.safetensors")
    monkeypatch.chdir(work)
    code, out, err = run_cli(capsys, "info", "ck.safetensors")
    assert code == 0, err
    assert ARCH in out


@pytest.mark.parametrize("args, fragment", [
    (["label-free"], "--preset cifar"),
    (["label-free", "--task", "digits=only_one_dir"], "NAME=TRAIN_DIR:TEST_DIR"),
    (["families", "--families", "mae,simclr"], "simclr"),
    (["c10c", "--label", "../up"], "--label"),                      # a label must be a file name
    (["families", "--label", "../up"], "--label"),
    (["c10c", "--set", "severity=3"], "use --severity"),            # a setting with its own flag
    (["c10c", "--protocol", "other"], "--protocol"),
    (["c10c", "--split", "test"], "--split"),
    (["c10c", "--set", "split=tuning"], "use --split"),
])
def test_bench_rejects_bad_input_in_one_line(capsys, tmp_path, args, fragment):
    extra = [] if args[0] == "label-free" else ["--work", str(tmp_path), "--no-progress"]
    code, _, err = run_cli(capsys, "bench", *args, *extra)
    assert code == 2
    assert_one_line_error(err, fragment)


@pytest.mark.parametrize("command", [["c10c"], ["families"], ["label-free", "--preset", "cifar"],
                                     ["imagenet-c", "--root", ".", "--model", "m.safetensors", "--source", "."]])
@pytest.mark.parametrize("missing", ["sklearn", "imagecorruptions"])
def test_bench_without_its_extra_says_how_to_install_it(capsys, monkeypatch, tmp_path, command, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # as if the [bench] extra were not installed
    code, _, err = run_cli(capsys, "bench", *command, "--work", str(tmp_path), "--no-progress")
    assert code == 2
    assert_one_line_error(err, missing, "pip install 'adaptsoup[bench]'")


def _help_defaults(help_text: str) -> dict[str, str]:
    """``{"quick": "100", "full": "400"}`` from a flag's help "...; quick 100, full 400." (or "quick and full X")."""
    import re

    both = re.search(r"quick and full ([0-9.e+-]*[0-9])", help_text)
    if both:
        return {"quick": both.group(1), "full": both.group(1)}
    found = re.search(r"quick ([0-9.e+-]*[0-9]), full ([0-9.e+-]*[0-9])", help_text)
    return {"quick": found.group(1), "full": found.group(2)}


def test_label_free_help_states_the_defaults_its_config_uses():
    """The defaults --help shows are LabelFreeConfig's (the help said lr 1e-4 while 2e-5 ran)."""
    from adaptsoup_bench.label_free import LabelFreeConfig

    command = typer.main.get_command(app).commands["bench"].commands["label-free"]
    helps = {param.name: param.help for param in command.params}
    for field in ("lr", "steps", "mmcr_views", "samples", "self_season_epochs", "train_images", "test_images", "labeled_images"):
        shown = _help_defaults(helps[field])
        for mode in ("quick", "full"):
            assert float(shown[mode]) == getattr(LabelFreeConfig.for_mode(mode), field), (field, mode, helps[field])


def test_cli_modules_import_neither_torch_nor_the_benchmarks_themselves():
    """Each command module defers torch, timm and adaptsoup_bench to the commands' bodies."""
    import ast

    cli_dir = Path(__file__).resolve().parent.parent / "cli"
    for path in sorted(cli_dir.glob("*.py")):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        heavy = {n for n in names if n.split(".")[0] in ("torch", "timm", "adaptsoup_bench", "sklearn", "imagecorruptions")}
        assert not heavy, f"{path.name} imports {heavy} at module level"


def test_adapt_pretrained_must_exist_in_one_line(capsys, tmp_path, checkpoint, image_folder):
    code, _, err = run_cli(capsys, "adapt", "--model", checkpoint, "--target", image_folder, "--source", image_folder,
                           "--out", tmp_path / "run", "--pretrained", tmp_path / "missing.safetensors", "--no-progress")
    assert code == 2
    assert_one_line_error(err, "--pretrained checkpoint not found")


# Issue #15: non-positive sizes and unknown quantizations are refused in one line, before any work.
@pytest.mark.parametrize("flags, fragment", [
    (["--inter-steps", "-5"], "--inter-steps"),
    (["--inter-steps", "0"], "--inter-steps"),
    (["--ft-steps", "0"], "--ft-steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--max-target-images", "-1"], "--max-target-images"),
    (["--inter-epochs", "-1"], "inter.epochs must be > 0"),
    (["--precision", "fp16"], "--precision must be auto, fp32 or bf16"),  # issue #16
    (["--precision", "bf16", "--fp32"], "--precision bf16 contradicts --fp32"),
])
def test_adapt_refuses_non_positive_sizes_and_bad_precisions(capsys, tmp_path, checkpoint, image_folder, flags, fragment):
    code, _, err = run_cli(capsys, "adapt", "--model", checkpoint, "--target", image_folder, "--source", image_folder,
                           "--out", tmp_path / "run", "--no-progress", *flags)
    assert code == 2
    assert_one_line_error(err, fragment)
    assert not (tmp_path / "run").exists()


def test_a_recipe_with_the_older_bf16_key_still_reads():
    from adaptsoup.pipeline.recipe import AdaptConfig

    assert AdaptConfig.from_dict({"bf16": True}).precision == "bf16"
    assert AdaptConfig.from_dict({"bf16": False}).precision == "fp32"
    assert AdaptConfig.from_dict({}).precision == "auto"
    with pytest.raises(Exception, match="contradicts"):
        AdaptConfig.from_dict({"bf16": True, "precision": "fp32"})


def test_tta_refuses_batch_size_zero(capsys, tmp_path, checkpoint, image_folder):
    code, _, err = run_cli(capsys, "tta", "--model", checkpoint, "--target", image_folder, "--out", tmp_path / "t", "--batch-size", "0")
    assert code == 2
    assert_one_line_error(err, "--batch-size")


def test_export_refuses_an_unknown_quantization_before_any_work(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "--model", tmp_path / "not-yet.safetensors", "--onnx", tmp_path / "m.onnx", "--quantize", "int4")
    assert code == 2
    assert_one_line_error(err, "--quantize", "int4")
    assert not (tmp_path / "m.onnx").exists()


# Issue #15: destinations checked before any work; unreadable ONNX files and OS errors in one line.
def test_export_refuses_bad_destinations_before_loading_the_model(capsys, tmp_path):
    missing_model = tmp_path / "not-loaded.safetensors"  # never reached: the destination is refused first
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "folder.onnx").mkdir()
    for onnx, fragment in ((tmp_path / "folder.onnx", "existing folder"), (tmp_path / "a-file" / "m.onnx", "is a file")):
        code, _, err = run_cli(capsys, "export", "--model", missing_model, "--onnx", onnx)
        assert code == 2
        assert_one_line_error(err, "--onnx", fragment)


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--batch-size", "-3"), ("--batch-size", "many"),
                                           ("--threads", "0"), ("--threads", "two")])
def test_bad_predict_options_are_one_line(capsys, tmp_path, image_folder, option, value):
    code, _, err = run_cli(capsys, "predict", "--onnx", tmp_path / "unread.onnx", image_folder, option, value)
    assert code == 2
    assert_one_line_error(err, option)


def test_predict_refuses_a_csv_it_cannot_write_before_any_work(capsys, tmp_path, image_folder):
    (tmp_path / "a-file").write_text("x")
    code, _, err = run_cli(capsys, "predict", "--onnx", tmp_path / "unread.onnx", image_folder, "--csv", tmp_path / "a-file" / "p.csv")
    assert code == 2
    assert_one_line_error(err, "--csv", "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_predict_refuses_a_read_only_folder(capsys, tmp_path, image_folder):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    code, _, err = run_cli(capsys, "predict", "--onnx", tmp_path / "unread.onnx", image_folder, "--csv", ro / "p.csv")
    assert code == 2
    assert_one_line_error(err, "--csv", "cannot write")


def test_os_errors_are_one_line(capsys, tmp_path, image_folder, monkeypatch):
    import adaptsoup.deploy.predict as predict_module

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "p.csv"))

    monkeypatch.setattr(predict_module, "predict_folder", denied)
    code, _, err = run_cli(capsys, "predict", "--onnx", tmp_path / "m.onnx", image_folder, "--csv", tmp_path / "p.csv")
    assert code == 2
    assert_one_line_error(err, "Permission denied", "p.csv")


def _onnx_with_metadata(path: Path, props: dict[str, str]) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "bad-json", "wrong-shape"])
def test_unreadable_onnx_files_are_one_line(capsys, tmp_path, image_folder, kind):
    path = tmp_path / f"{kind}.onnx"
    good = {"adaptsoup.input_size": "[3, 32, 32]", "adaptsoup.mean": "[0.5, 0.5, 0.5]", "adaptsoup.std": "[0.2, 0.2, 0.2]"}
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        data = _onnx_with_metadata(path, good).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        bad = {"adaptsoup.mean": "[0.5, 0.5"} if kind == "bad-json" else {"adaptsoup.input_size": "[3, 32]"}
        _onnx_with_metadata(path, {**good, **bad})
    for args in (("info", path), ("predict", "--onnx", path, image_folder, "--csv", tmp_path / "p.csv")):
        code, _, err = run_cli(capsys, *args)
        assert code == 2, err
        assert_one_line_error(err, str(path))
    assert not (tmp_path / "p.csv").exists()


# Issue #15: help, argument errors and `info` answer without importing torch (well under 1.5 s).
LIGHT = """
import sys, runpy
sys.argv = ["adaptsoup", *sys.argv[1:]]
try:
    runpy.run_module("adaptsoup_cli.main", run_name="__main__")
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)
print("HEAVY:" + ",".join(heavy), file=sys.stderr)
"""


def _light_run(*args) -> tuple[float, str]:
    import time

    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", LIGHT, *map(str, args)], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, COLUMNS="200"))
    return time.perf_counter() - started, result.stderr


def test_help_errors_and_info_do_not_import_torch(tmp_path, checkpoint):
    from adaptsoup.deploy.onnx import export_onnx

    onnx_path = export_onnx(tiny_model(), tmp_path / "m.onnx", log=lambda _: None).path
    for args in (["--help"], ["adapt", "--help"], ["export", "--bogus"], ["adapt", "--batch-size", "0"],
                 ["info", checkpoint], ["info", onnx_path], ["info", tmp_path / "missing.safetensors"]):
        took, stderr = min(_light_run(*args), _light_run(*args))  # the faster of two: the machine may be busy
        assert stderr.strip().endswith("HEAVY:"), f"{args}: {stderr[-500:]}"
        assert took < 1.5, f"{args} took {took:.2f} s"


def test_info_from_the_header_matches_the_tensors(capsys, checkpoint):
    from adaptsoup.core.checkpoint import read_checkpoint, safetensors_summary

    state, meta = read_checkpoint(checkpoint)
    assert safetensors_summary(checkpoint) == (len(state), sum(v.numel() for v in state.values()), meta)


def test_import_adaptsoup_is_light_and_still_registers_the_small_vits():
    code = ("import sys, adaptsoup; assert 'torch' not in sys.modules; import timm; "
            "print(type(timm.create_model('vit_pico_patch4_32')).__name__, adaptsoup.load_model.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["VisionTransformer", "load_model"], result.stderr[-2000:]
