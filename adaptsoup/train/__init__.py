"""Training: the resumable loop, its optimiser and schedule, the loss functions, and LP-FT.
"""
