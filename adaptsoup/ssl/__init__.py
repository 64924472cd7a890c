"""Self-supervised inter-training losses (no labels): MAE, MoCo v3, MMCR, and their registry by name.
"""
