"""``adapt`` as explicit stages over a run directory: the recipe and its plan; inter-training, fine-tuning
back, soups, evaluation, mixing and test-time adaptation, each a function of the run; and ``job``, the
``adaptsoup adapt`` command as one library call (recipe file + flags, resume).
"""
