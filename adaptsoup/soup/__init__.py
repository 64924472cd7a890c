"""Mixing ingredients into one model (a soup).

Read in this order:

* :mod:`~adaptsoup.soup.checks` — when ingredients can be mixed (keys, shapes, architectures, weights);
* :mod:`~adaptsoup.soup.average` — the float64 weighted average, streamed from files or in memory;
* :mod:`~adaptsoup.soup.stacked` — M ingredients held once as ``[M, *shape]`` tensors, mixed by coefficients;
* :mod:`~adaptsoup.soup.knn` — the k-NN entropy (Self-Seasoning's loss) and k-NN accuracy, pure tensor functions;
* :mod:`~adaptsoup.soup.scoring` — held-out accuracy of a mixed model (classifier or k-NN);
* :mod:`~adaptsoup.soup.registry` — what a mixing method is (name, options, data it needs, function);
* :mod:`~adaptsoup.soup.methods` — one method per module; importing the package registers them all;
* :mod:`~adaptsoup.soup.run` — ``adaptsoup mix`` over an adapt run directory.
"""
