"""Every mixing method, one per module; importing this package registers them all.

========================  =======  ===================================================================
method                    needs    module
========================  =======  ===================================================================
``uniform``               —        :mod:`.uniform` (the plain average, streamed)
``model-stock``           stock    :mod:`.model_stock` (per-tensor interpolation towards the stock)
``self-season``           target   :mod:`.self_season` (coefficients learned by kNN entropy, no labels)
``self-season-tv``        target   :mod:`.task_vector_season` (task-vector scales learned by kNN entropy, no labels)
``season``                labels   :mod:`.season` (best Dirichlet sample by held-out k-NN accuracy)
``greedy``                labels   :mod:`.greedy` (greedy soup)
``best``                  labels   :mod:`.best` (the single best ingredient)
========================  =======  ===================================================================

Use :func:`get` and :func:`names` from here: through this package the table is always complete.
"""

from adaptsoup.soup.methods import best, greedy, model_stock, season, self_season, task_vector_season, uniform  # noqa: F401  (registers each)
from adaptsoup.soup.registry import get, names

__all__ = ["get", "names"]
