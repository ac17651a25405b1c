"""A model named by a reference: a zoo name, or the user's own factory.

    "small_resnet"                 a zoo entry (`splitexit models`)
    "mypackage.models:build"       a factory in an importable module
    "path/to/mycnn.py:build"       a factory in a Python file (relative to the working dir)
        ─ load_factory ─ factory(**kwargs) ─ nn.Module ─ staged_at(points) ─ StagedModel

The same forms work everywhere a model is named (`train`, `profile`, `models`, `export`,
`calibrate`). A factory returns an ``nn.Module``: a :class:`StagedModel`, an ``nn.Sequential``
or any torch.fx-traceable model; its split and exit points are its named children / modules
(`valid_split_points`). A factory that takes ``num_classes`` is given the dataset's count.
A run records the reference and its kwargs, so `export` and `calibrate` rebuild the model;
a bundle never needs the user's code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from splitexit.errors import ConfigError

__all__ = ["build_reference", "is_zoo_name", "load_factory", "resolve_reference"]


def is_zoo_name(ref: str) -> bool:
    """True for a zoo name, False for a ``module:factory`` or ``file.py:factory`` reference."""
    return ":" not in ref


def resolve_reference(ref: str) -> str:
    """The reference with a file path made absolute, so that a run can be rebuilt from any
    working directory; zoo names and module references come back unchanged."""
    if is_zoo_name(ref):
        return ref
    where, _, attr = ref.rpartition(":")
    if where.endswith(".py"):
        return f"{Path(where).resolve()}:{attr}"
    return ref


def load_factory(ref: str) -> Callable[..., Any]:
    """The callable (or module instance) that ``module:factory`` / ``file.py:factory`` names.

    Raises ConfigError with the form to use when the module, file or attribute is missing
    or the module fails to import.
    """
    where, sep, attr = ref.rpartition(":")
    if not sep or not where or not attr:
        raise ConfigError(
            f"model reference {ref!r} must be a zoo name, package.module:factory or "
            "path/to/file.py:factory"
        )
    if where.endswith(".py"):
        module = _import_file(Path(where), ref)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # as `python -m` and uvicorn's --app-dir do
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise ConfigError(
                f"cannot import {where!r} for model {ref!r} ({e}); give package.module:factory "
                "with the package importable (installed, or run from its folder), or "
                "path/to/file.py:factory"
            ) from None
        except Exception as e:  # the user's module raised while importing
            raise ConfigError(
                f"importing {where!r} for model {ref!r} failed: {type(e).__name__}: {e}"
            ) from None
    factory: Callable[..., Any] | None = getattr(module, attr, None)
    if factory is None:
        own = sorted(
            n
            for n, v in vars(module).items()
            if callable(v)
            and getattr(v, "__module__", None) == module.__name__
            and not n.startswith(("_", "test_"))
        )
        raise ConfigError(
            f"{where} has no {attr!r} for model {ref!r}; its functions and classes: "
            f"{', '.join(own[:12]) or '(none)'}"
        )
    return factory


def _import_file(path: Path, ref: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist (model {ref!r})")
    resolved = path.resolve()
    name = "splitexit_user_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:  # pragma: no cover - .py files always have one
        raise ConfigError(f"cannot load {path} as a Python module (model {ref!r})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(
            f"running {path} for model {ref!r} failed: {type(e).__name__}: {e}"
        ) from None
    return module


def build_reference(
    ref: str, kwargs: Mapping[str, Any] | None = None, *, num_classes: int | None = None
) -> nn.Module:
    """Call the factory ``ref`` names with ``kwargs`` (and ``num_classes`` where it takes one).

    A module instance in place of a factory is returned as it is. Raises ConfigError when
    the factory raises or returns something that is not an ``nn.Module``.
    """
    factory = load_factory(ref)
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise ConfigError(f"{ref} is a {type(factory).__name__}, not a factory or an nn.Module")
    kw = dict(kwargs or {})
    if num_classes is not None and "num_classes" not in kw and _takes(factory, "num_classes"):
        kw["num_classes"] = num_classes
    try:
        model = factory(**kw)
    except Exception as e:
        raise ConfigError(
            f"model factory {ref} raised {type(e).__name__}: {e} (called with {kw}); fix the "
            "factory or teacher.kwargs"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model factory {ref} returned a {type(model).__name__}, not an nn.Module"
        )
    return model


def _takes(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
