"""Test-time adaptation stacked on a soup: ``entropy`` (shared pieces); the backprop methods ``sar``, ``tent``,
``eata`` and ``roid``; ``adapter`` (a model adapting online), ``guard`` (its label-free reset when the
predictions drift) and ``stream`` (the online pass and its run directory); and ``foa``, forward-only
adaptation of an exported ONNX model (CMA-ES over prompt tokens and activation shifting, no gradients).
"""
