"""Deployment: ONNX export with parity checks, int8 quantization and folder prediction.
"""
