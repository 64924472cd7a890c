"""Deployment: ``onnx`` (export, metadata, parity), ``quantize`` (int8), ``predict`` (a folder through an exported
model), ``runtime`` (the onnxruntime session they share).
"""
