"""The foundations every stage shares: timm models and their metadata, checkpoints, image folders,
evaluation, atomic file writes, run manifests, progress bars and memory sampling.
"""
