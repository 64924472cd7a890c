"""Graph fusions for onnxruntime on the CPU, written into the exported ``.onnx`` file itself.

onnxruntime's transformer optimizer (``onnxruntime.transformers.optimizer``, model type ``vit``) rewrites
the exported graph into its fused contrib operators: ``Attention`` (packed q/k/v projection, softmax and
context in one kernel), ``BiasGelu`` (the MLP's bias + GELU) and ``LayerNormalization``.  The fused nodes
live in the file (domain ``com.microsoft``), so any onnxruntime session that loads it runs them.

Two choices, measured on a 2-core AMD EPYC (see :data:`FUSIONS`):

* ``SkipLayerNormalization`` (residual add + LayerNorm in one node) is left out: in a single-operator
  check (onnxruntime 1.32, one thread, 4160x192 floats) its fp32 CPU kernel took about 5x as long as the
  Add + LayerNormalization it replaces.
* Residual ``Add`` nodes are reordered so that the attention branch is their first input: the optimizer's
  pattern matcher takes the first ``Add`` parent it finds, and a residual stream that is itself an ``Add``
  (every block without SkipLayerNormalization, and the first block always) would hide the attention.

The attention pattern the optimizer recognises is the one :mod:`adaptsoup.deploy.fusable` exports.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from torch import nn

from adaptsoup.deploy.runtime import quiet

# The optimizer's switches (FusionOptions attributes) adaptsoup sets; everything else keeps its default.
FUSIONS = {
    "enable_attention": True,
    "use_multi_head_attention": False,  # the packed Attention op: one GEMM for q, k and v
    "enable_gelu": True,
    "enable_bias_gelu": True,
    "enable_layer_norm": True,
    "enable_skip_layer_norm": False,  # slower than Add + LayerNormalization on the CPU (see above)
    "enable_bias_skip_layer_norm": False,
    "enable_embed_layer_norm": False,  # a BERT text-embedding pattern; nothing to match in a ViT
}
FUSED_OPS = ("Attention", "MultiHeadAttention", "BiasGelu", "Gelu", "FastGelu", "LayerNormalization", "SkipLayerNormalization")


@dataclass(frozen=True)
class VitShape:
    """What the optimizer needs to know about the transformer: heads per attention and the token width."""

    num_heads: int
    hidden_size: int


@dataclass
class Optimization:
    """What :func:`optimize_proto` did: the fused nodes in the result by op type, or why nothing was done."""

    applied: bool
    fused: dict[str, int] = field(default_factory=dict)
    reason: str | None = None  # why the plain graph was kept


def vit_shape(model: nn.Module) -> VitShape | None:
    """Heads and width of a timm ViT's attention, or None for a model without transformer blocks."""
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not hasattr(attn, "num_heads"):
        return None
    return VitShape(num_heads=int(attn.num_heads), hidden_size=int(attn.num_heads * attn.head_dim))


def count_fused(proto) -> dict[str, int]:
    """How many nodes of each fused op type a graph holds (types that do not occur are left out)."""
    counts = collections.Counter(node.op_type for node in proto.graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


def branch_first(proto) -> int:
    """Put the branch (an ``Add`` of a bias onto a ``MatMul``) first in each two-tensor ``Add``; returns how many moved."""
    made_by = {out: node for node in proto.graph.node for out in node.output}

    def is_projection(name: str) -> bool:
        node = made_by.get(name)
        return node is not None and node.op_type == "Add" and any(
            made_by.get(i) is not None and made_by[i].op_type == "MatMul" for i in node.input)

    moved = 0
    for node in proto.graph.node:
        if node.op_type == "Add" and len(node.input) == 2 and all(i in made_by for i in node.input):
            if is_projection(node.input[1]) and not is_projection(node.input[0]):
                node.input[0], node.input[1] = node.input[1], node.input[0]
                moved += 1
    return moved


def fused_graph(proto, shape: VitShape):
    """onnxruntime's transformer optimizer over ``proto`` (python fusions only: the file stays portable)."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("vit")
    for name, value in FUSIONS.items():
        setattr(options, name, value)
    branch_first(proto)
    optimized = optimize_model(proto, model_type="vit", num_heads=shape.num_heads, hidden_size=shape.hidden_size,
                               optimization_options=options, opt_level=0)
    optimized.topological_sort()
    fused = optimized.model
    domains = {node.domain for node in fused.graph.node} - {"", "ai.onnx"}
    declared = {entry.domain for entry in fused.opset_import}
    fused.opset_import.extend(onnx.helper.make_opsetid(domain, 1) for domain in sorted(domains - declared))
    return fused


def optimize_proto(proto, shape: VitShape | None):
    """``(fused proto, Optimization)``; on any failure of the optimizer, ``(proto, Optimization(False, reason=...))``.

    The metadata properties and producer of ``proto`` are carried over; the result is checked by
    ``onnx.checker`` (contrib operators included) before it is returned.
    """
    import copy

    import onnx

    if shape is None:
        return proto, Optimization(applied=False, reason="not a ViT (no transformer blocks with attention)")
    try:
        with quiet():
            fused = fused_graph(copy.deepcopy(proto), shape)
        del fused.metadata_props[:]
        fused.metadata_props.extend(proto.metadata_props)
        fused.producer_name = proto.producer_name
        onnx.checker.check_model(fused)
    except Exception as exc:  # noqa: BLE001 - the plain export stays usable; the caller logs the reason
        reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        return proto, Optimization(applied=False, reason=reason)
    if "Attention" not in count_fused(fused) and "MultiHeadAttention" not in count_fused(fused):
        return fused, Optimization(applied=True, fused=count_fused(fused), reason="no attention was fused")
    return fused, Optimization(applied=True, fused=count_fused(fused))
