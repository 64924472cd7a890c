"""``adapt`` as explicit stages over a run directory: recipe, plan, inter-train, fine-tune back, soups, evaluate.
"""
