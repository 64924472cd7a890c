"""Test-time adaptation stacked on a soup: ``entropy`` (shared pieces), ``sar``, ``tent``, ``adapter`` (a model
adapting online) and ``stream`` (the online pass and its run directory).
"""
