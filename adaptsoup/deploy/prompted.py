"""A prompt-capable ONNX export of a ViT, for forward-only test-time adaptation (:mod:`adaptsoup.tta.foa`).

The graph (:func:`export_prompted`) has three inputs and four outputs:

* ``input`` [B, 3, H, W]: the normalised images, as in the plain export;
* ``prompts`` [P, D]: P prompt tokens of the ViT's width D, inserted into every image's token sequence after
  the patch embedding and the position embedding, right behind the class token (behind every prefix token:
  class and register tokens), with no position embedding of their own. P is a dynamic dimension and may be
  0: with no prompts the graph computes exactly what the plain model computes;
* ``shift`` [D]: added to the pre-head features before the head (FOA's activation shifting; zeros: none);
* ``logits`` [B, C] = head(features + shift): the prediction;
* ``features`` [B, D]: the pre-head features (the class token after the final norm, and ``fc_norm`` where the
  model has one), before the shift;
* ``layer_features`` [B, L, D]: the class token after each of the L blocks, normalised as FOA's official
  code does: after block i < L-1 by block i+1's ``norm1``; the last row is ``features``;
* ``logits_unshifted`` [B, C] = head(features).

The prompt tokens are removed again after the final norm, so pooling and the head see the tokens the plain
model has. The file carries the plain export's metadata (class names, preprocessing) and
``adaptsoup.prompted``: a JSON object with the width, the depth, the prefix tokens and the patch size.
:func:`freeze_prompts` writes a copy with given prompts and shift as constants: one input ``input`` and one
output ``logits``, a model like any other export (``adaptsoup predict`` runs it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from adaptsoup.core.io import atomic_path
from adaptsoup.core.models import model_meta, require_vit
from adaptsoup.deploy.fusable import fusable_copy
from adaptsoup.deploy.onnx import DEFAULT_OPSET, export_with_fallback, finish_exported, onnx_metadata, written_opset
from adaptsoup.deploy.runtime import ort_session, quiet, read_onnx_metadata
from adaptsoup.errors import AdaptsoupError

INPUTS = ("input", "prompts", "shift")
OUTPUTS = ("logits", "features", "layer_features", "logits_unshifted")
META_KEY = "adaptsoup.prompted"
PARITY_TOLERANCE = 1e-4  # |logit difference| between the file and PyTorch, fp32, on the parity check


class PromptedViT(nn.Module):
    """A timm ViT with ``prompts`` [P, D] inserted behind its prefix tokens and ``shift`` [D] added to its
    pre-head features; returns ``(logits, features, layer_features, logits_unshifted)`` (see the module)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = require_vit(vit, "a prompt-capable export")
        if int(self.vit.num_prefix_tokens) < 1 or getattr(self.vit, "cls_token", None) is None:
            raise AdaptsoupError("forward-only adaptation needs a ViT with a class token (its statistics are the class token's)")
        if self.vit.attn_pool is not None:
            raise AdaptsoupError("forward-only adaptation supports class-token and average pooling, not attention pooling")

    def forward(self, x: torch.Tensor, prompts: torch.Tensor, shift: torch.Tensor):
        vit, prefix = self.vit, int(self.vit.num_prefix_tokens)
        tokens = vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))
        inserted = prompts.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        tokens = vit.norm_pre(torch.cat([tokens[:, :prefix], inserted, tokens[:, prefix:]], dim=1))
        layers = []
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if i + 1 < len(vit.blocks):
                layers.append(vit.blocks[i + 1].norm1(tokens[:, 0]))
        tokens = vit.norm(tokens)
        tokens = torch.cat([tokens[:, :prefix], tokens[:, prefix + prompts.shape[0]:]], dim=1)
        features = vit.forward_head(tokens, pre_logits=True)
        layers.append(features)
        return vit.head(features + shift), features, torch.stack(layers, dim=1), vit.head(features)


@dataclass(frozen=True)
class PromptedShape:
    """What FOA needs to know of a prompt-capable graph, from its metadata."""

    embed_dim: int
    depth: int
    prefix_tokens: int
    patch_size: tuple[int, int]

    def prompt_init_bound(self) -> float:
        """VPT's (and FOA's) uniform bound for initial prompts: sqrt(6 / (3·patch area + D))."""
        return float(np.sqrt(6.0 / (3 * self.patch_size[0] * self.patch_size[1] + self.embed_dim)))


def prompted_shape(model: nn.Module) -> PromptedShape:
    vit = require_vit(model, "a prompt-capable export")
    patch = vit.patch_embed.patch_size
    return PromptedShape(int(vit.embed_dim), len(vit.blocks), int(vit.num_prefix_tokens), (int(patch[0]), int(patch[1])))


@dataclass
class PromptedExport:
    path: Path
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    max_abs_diff: float  # against PyTorch (the original model's modules), P prompts and a shift, on noise
    max_abs_diff_no_prompts: float  # P = 0 and no shift, against the original model's own forward
    int8_path: Path | None = None
    fallback_reason: str | None = None
    fused: dict[str, int] | None = None


def _export(module: nn.Module, example: tuple, path: Path, opset: int, dynamo: bool) -> None:
    common = dict(input_names=list(INPUTS), output_names=list(OUTPUTS), dynamo=dynamo)
    with quiet():
        if dynamo:
            batch, count = torch.export.Dim("batch", min=1), torch.export.Dim("prompts", min=0)
            torch.onnx.export(module, example, str(path), opset_version=opset, external_data=False, verbose=False,
                              dynamic_shapes=({0: batch}, {0: count}, None), **common)
        else:
            axes = {"input": {0: "batch"}, "prompts": {0: "prompts"}, **{name: {0: "batch"} for name in OUTPUTS}}
            torch.onnx.export(module, example, str(path), opset_version=min(opset, 17), dynamic_axes=axes, **common)


def export_prompted(model: nn.Module, out_path: str | os.PathLike, *, int8: bool = False, optimize: bool = True,
                    opset: int = DEFAULT_OPSET, log: Callable[[str], None] = print) -> PromptedExport:
    """Write the prompt-capable graph of ``model`` (see the module) to ``out_path``, atomically, and check it in
    onnxruntime: with 2 prompts and a shift against :class:`PromptedViT` over the original model, and with none
    against the model itself (both within :data:`PARITY_TOLERANCE`, on seeded noise).  With ``int8``, also
    its dynamic int8 copy ``NAME.int8.onnx`` (:func:`adaptsoup.deploy.quantize.quantize_int8`)."""
    model = model.eval().cpu()
    shape = prompted_shape(model)
    reference = PromptedViT(model).eval()
    source = PromptedViT(fusable_copy(model)[0] if optimize else model).eval()
    _, h, w = model_meta(model).input_size
    gen = torch.Generator().manual_seed(0)
    example = (torch.randn(2, 3, h, w, generator=gen), 0.1 * torch.randn(2, shape.embed_dim, generator=gen),
               0.1 * torch.randn(shape.embed_dim, generator=gen))
    out_path = Path(out_path)
    fused = None
    with atomic_path(out_path) as tmp:
        exporter, reason = export_with_fallback(lambda dynamo: _export(source, example, tmp, opset, dynamo=dynamo))
        metadata = {**onnx_metadata(model), META_KEY: json.dumps(
            {"embed_dim": shape.embed_dim, "depth": shape.depth, "prefix_tokens": shape.prefix_tokens,
             "patch_size": list(shape.patch_size), "inputs": list(INPUTS), "outputs": list(OUTPUTS)})}
        proto, optimization = finish_exported(tmp, metadata, model, optimize)
        if optimization is not None:
            fused = optimization.fused
            if optimization.reason is not None:
                log(f"ONNX optimisation of the prompt-capable graph: {optimization.reason}")
        session = PromptedSession(tmp)
        x = torch.randn(3, 3, h, w, generator=gen)
        prompts, shift = 0.5 * torch.randn(2, shape.embed_dim, generator=gen), 0.5 * torch.randn(shape.embed_dim, generator=gen)
        with torch.no_grad():
            want = reference(x, prompts, shift)[0].numpy()
            plain = model(x).numpy()
        diff = float(np.abs(session.run(x.numpy(), prompts.numpy(), shift.numpy())["logits"] - want).max())
        diff0 = float(np.abs(session.run(x.numpy(), None, None)["logits"] - plain).max())
        if max(diff, diff0) > PARITY_TOLERANCE:
            raise AdaptsoupError(f"prompt-capable ONNX export: max |logit difference| to PyTorch {max(diff, diff0):.2e} "
                                 f"> {PARITY_TOLERANCE:.0e}")
    if reason is not None:
        log(f"prompt-capable ONNX export: the torch.export-based exporter failed ({reason}); used the TorchScript exporter")
    report = PromptedExport(out_path, exporter, written_opset(proto), diff, diff0, fallback_reason=reason, fused=fused)
    if int8:
        from adaptsoup.deploy.quantize import quantize_int8

        report.int8_path = quantize_int8(out_path)
    return report


class PromptedSession:
    """An onnxruntime session over a prompt-capable graph: ``run(x, prompts, shift)`` returns its four outputs
    by name.  Refuses, in one line, a file that is not ONNX or a graph without the prompt inputs."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise AdaptsoupError(f"ONNX model not found: {self.path}")
        self.meta = read_onnx_metadata(self.path)  # one line for garbage, and for files adaptsoup did not write
        self.session = ort_session(self.path, threads)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if "prompts" not in inputs or set(inputs) != set(INPUTS) or not set(OUTPUTS) <= set(outputs):
            raise AdaptsoupError(
                f"{self.path} is not a prompt-capable export (inputs {', '.join(inputs)}; forward-only adaptation needs "
                f"inputs {', '.join(INPUTS)} and outputs {', '.join(OUTPUTS)}): build one from its checkpoint with "
                f"adaptsoup tta --model CHECKPOINT --onnx {self.path.name} --method foa")
        props = read_prompted_props(self.path)
        self.shape = PromptedShape(int(props["embed_dim"]), int(props["depth"]), int(props["prefix_tokens"]),
                                   tuple(int(v) for v in props["patch_size"]))

    def run(self, x: np.ndarray, prompts: np.ndarray | None, shift: np.ndarray | None) -> dict[str, np.ndarray]:
        """The four outputs for normalised images ``x``; ``prompts`` None: no prompts (P = 0), ``shift`` None: zeros."""
        dim = self.shape.embed_dim
        prompts = np.zeros((0, dim), np.float32) if prompts is None else np.asarray(prompts, np.float32).reshape(-1, dim)
        shift = np.zeros(dim, np.float32) if shift is None else np.asarray(shift, np.float32).reshape(dim)
        values = self.session.run(list(OUTPUTS), {"input": np.ascontiguousarray(x, np.float32), "prompts": prompts, "shift": shift})
        return dict(zip(OUTPUTS, values))


def read_prompted_props(path: str | os.PathLike) -> dict:
    """The ``adaptsoup.prompted`` metadata of a prompt-capable export."""
    from adaptsoup.deploy.onnx_props import read_metadata_props

    raw = read_metadata_props(path).get(META_KEY)
    try:
        props = json.loads(raw) if raw is not None else None
        if not isinstance(props, dict) or not all(k in props for k in ("embed_dim", "depth", "prefix_tokens", "patch_size")):
            raise ValueError("missing fields")
        return props
    except (ValueError, TypeError):
        raise AdaptsoupError(f"{path}: no usable {META_KEY} metadata (was it written by adaptsoup's prompt-capable export?)") from None


def freeze_prompts(path: str | os.PathLike, out_path: str | os.PathLike, prompts: np.ndarray | None,
                   shift: np.ndarray | None) -> Path:
    """A copy of the prompt-capable graph at ``path`` with ``prompts`` [P, D] (None: none) and ``shift`` [D]
    (None: zeros) written in as constants: input ``input``, output ``logits``; atomically.  Its metadata is the
    source file's, less ``adaptsoup.prompted``, plus ``adaptsoup.foa`` (P, and that the shift is in)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    dim = int(read_prompted_props(path)["embed_dim"])
    values = {"prompts": np.zeros((0, dim), np.float32) if prompts is None else np.asarray(prompts, np.float32).reshape(-1, dim),
              "shift": np.zeros(dim, np.float32) if shift is None else np.asarray(shift, np.float32).reshape(dim)}
    graph = proto.graph
    kept = [i for i in graph.input if i.name not in values]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in values.items())
    outputs = [o for o in graph.output if o.name == "logits"]
    del graph.output[:]
    graph.output.extend(outputs)
    props = [(p.key, p.value) for p in proto.metadata_props if p.key != META_KEY]
    props.append(("adaptsoup.foa", json.dumps({"prompts": int(values["prompts"].shape[0]), "shift_norm": float(np.linalg.norm(values["shift"]))})))
    del proto.metadata_props[:]
    for key, value in props:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        onnx.save(proto, str(tmp))
    return out_path
