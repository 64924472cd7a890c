"""What a mixing method is, and the table of methods by name.

A method is a function ``fn(context, options) -> MixResult``: the context says what there is to mix and
with which data (:class:`MixContext`), the options are the method's own small dataclass.  Each method
module registers itself with :func:`register`; this module imports none of them, so import
:mod:`adaptsoup.soup.methods` (which imports every one) before :func:`get` or :func:`names`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch

from adaptsoup.errors import AdaptsoupError

Needs = Literal["none", "target", "labels"]  # the data a method uses besides the ingredients


@dataclass
class MixContext:
    """What there is to mix, and with what: ``target`` is unlabeled, ``labeled`` the few-label set (ImageSets)."""

    paths: list[Path]
    names: list[str]
    stock_path: Path | None = None  # the model the ingredients were fine-tuned from
    target: Any = None
    labeled: Any = None
    device: str = "cpu"  # where methods that hold the ingredients in memory run the mixed model
    progress: Any = None
    log: Callable[[str], None] = lambda message: None


@dataclass
class MixResult:
    """What a mixing method produced: the soup and what it learned (coefficients, diagnostics)."""

    state_dict: dict[str, torch.Tensor]
    coefficients: list[float] | None  # one per ingredient, or None (Model Stock mixes per tensor)
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MixMethod:
    """A registered mixing method: ``method(context, options)`` runs it (default options when None)."""

    name: str
    options_type: type
    needs: Needs
    fn: Callable[[MixContext, Any], MixResult]

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""

    def default_options(self) -> Any:
        return self.options_type()

    def options_from(self, values: Mapping[str, Any]) -> Any:
        """This method's options, taking from ``values`` the fields it has (the others keep their defaults)."""
        fields = {f.name for f in dataclasses.fields(self.options_type)}
        return self.options_type(**{k: v for k, v in values.items() if k in fields})

    def __call__(self, context: MixContext, options: Any = None) -> MixResult:
        options = self.default_options() if options is None else options
        if not isinstance(options, self.options_type):
            raise AdaptsoupError(f"{self.name} takes {self.options_type.__name__}, not {type(options).__name__}")
        return self.fn(context, options)


_METHODS: dict[str, MixMethod] = {}


def register(name: str, options_type: type, needs: Needs = "none") -> Callable[[Callable], Callable]:
    """Decorator: register ``fn(context, options) -> MixResult`` under ``name``."""
    if needs not in ("none", "target", "labels"):
        raise ValueError(f"needs must be none, target or labels, got {needs!r}")

    def wrap(fn: Callable[[MixContext, Any], MixResult]) -> Callable[[MixContext, Any], MixResult]:
        if name in _METHODS:
            raise ValueError(f"mixing method {name!r} registered twice")
        _METHODS[name] = MixMethod(name, options_type, needs, fn)
        return fn

    return wrap


def get(name: str) -> MixMethod:
    if name not in _METHODS:
        raise AdaptsoupError(f"unknown mixing method {name!r}; choose one of: {', '.join(names())}")
    return _METHODS[name]


def names() -> list[str]:
    return sorted(_METHODS)
