"""What is looked up by name: evomerge's optimizers and search spaces (each module imported on first use, so listing
the names costs nothing; options checked against the class's own signature before it is built), and the user's own
functions, written 'module:function' (a fitness, a task generator, a points space)."""
from __future__ import annotations

import importlib
import inspect
from typing import Any

from evomerge.records import UserError


class Registry:
    def __init__(self, what: str, package: str, classes: dict[str, str]) -> None:
        self.what = what  # "optimizer", "search space": how errors name it
        self.package = package  # name's class is in module package.name
        self._classes = classes

    def names(self) -> list[str]:
        return list(self._classes)

    def get(self, name: str) -> type:
        if name not in self._classes:
            raise UserError(f"unknown {self.what} {name!r}; valid: {', '.join(self._classes)}")
        return getattr(importlib.import_module(f"{self.package}.{name}"), self._classes[name])

    def options(self, name: str) -> dict[str, inspect.Parameter]:
        """The options `name` takes from the user, by its class's signature (what evomerge hands every one, such as
        an optimizer's bounds and objectives, goes to the base class through **kwargs and is not listed)."""
        return {k: p for k, p in inspect.signature(self.get(name).__init__).parameters.items()
                if k != "self" and p.kind is not p.VAR_KEYWORD}

    def build(self, name: str, options: dict[str, Any], **given: Any) -> Any:
        """`name`'s class built from the user's `options` and the arguments evomerge `given` it; an unknown or
        missing option is one line naming it and the valid ones."""
        params = {k: p for k, p in self.options(name).items() if k not in given}
        unknown = [k for k in options if k not in params]
        if unknown:
            raise UserError(f"{self.what} {name!r} has no option {unknown[0]!r}; valid: {', '.join(params) or 'none'}")
        missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in options]
        if missing:
            raise UserError(f"{self.what} {name!r} needs option(s) {', '.join(missing)}")
        return self.get(name)(**given, **options)


def load_callable(spec: str, what: str) -> Any:
    """'package.module:function' -> the function; `what` names it in the one-line error (e.g. "fitness function")."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise UserError(f"{what} {spec!r} must be written 'module:function'")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{what} {spec!r}: cannot import {module!r} ({e})") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise UserError(f"{what} {spec!r}: {module!r} has no function {attr!r}")
    return fn
