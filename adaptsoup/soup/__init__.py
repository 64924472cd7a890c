"""Mixing ingredients into one model: streaming averages, stacked ingredients, the k-NN entropy, and
the mixing methods (uniform, Model Stock, Self-Seasoning, seasoning, greedy, best).
"""
