"""The one place that knows how the installed transformers names and passes things that changed inside 5.x.

- The cache argument: transformers 5.24 renamed the models' cache argument (and the output field) from
  ``past_key_values`` to ``cache``; the old name is deprecated, to be removed in 5.40. The name a model takes is read
  from its ``forward`` signature (``deprecate_kwarg`` keeps the signature of the wrapped function), never from a
  version number, so a model family that renames later is handled too. Everything else in the library passes and
  reads caches through this module.
- The padding mask: ``generate`` hands models with ``layer_types`` (Qwen2/3) a dict of masks per layer type.
- The cache ``generate`` makes: it decides whether to compile its decode step before the first forward pass, from
  the cache it prepared in ``GenerationMixin._prepare_cache_for_generation`` (same signature in 5.17 and 5.24; a
  test pins it). `install_generate_cache` wraps that method on one model instance, the only non-public seam used.
- Activation checkpointing: 5.24 renamed ``gradient_checkpointing_enable/disable`` to
  ``activation_checkpointing_enable/disable`` (the old names warn); `set_activation_checkpointing` uses either.
- Tensor parallelism: ``from_pretrained(distributed_config=DistributedConfig(tp_plan="auto"))`` (5.17 and 5.24; the
  bare ``tp_plan=`` argument is deprecated in both) records the split on the model: ``model.tp_size`` and
  ``model.tp_plan``, a dict from module names with ``*`` for layer numbers to style names. The style ``"colwise"``
  on q/k/v turns their weights into DTensors split on their rows, so each rank computes its own block of heads.

Supported and proven by CI: `TESTED_TRANSFORMERS` (both ends of the declared range in pyproject.toml).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
import transformers
from packaging.specifiers import SpecifierSet

from .errors import TransformersVersionError

CACHE_NAMES = ("cache", "past_key_values")  # the current name first, then the deprecated one
TESTED_TRANSFORMERS = ("5.17.0", "5.24.0")  # CI runs the suite at both ends
SUPPORTED_RANGE = ">=5.17,<5.25"  # pyproject.toml's requirement (a test keeps them equal): up to the next minor


def transformers_version() -> str:
    return transformers.__version__


def version_note() -> str:
    """``"transformers 5.24.0 (duo-attn supports >=5.17.0,<5.25)"``, for error messages."""
    return f"transformers {transformers_version()} (duo-attn supports {SUPPORTED_RANGE})"


@functools.cache
def _cache_argument_of(forward_owner: type) -> str:
    parameters = inspect.signature(forward_owner.forward).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise TransformersVersionError(
        f"{forward_owner.__name__}.forward takes none of the cache arguments {CACHE_NAMES} under {version_note()}: "
        "duo attention cannot supply its cache to this model"
    )


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` (and ``generate``) take the KV cache."""
    return _cache_argument_of(type(model))


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for a call of ``model(...)`` or ``model.generate(...)``, with no deprecation warning."""
    return {cache_argument(model): cache}


def take_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the cache from a forward call's keyword arguments, under whichever name it was passed.

    Passing it under both names is refused, as is any other keyword argument holding a `Cache` (a name this module
    does not know would otherwise carry the cache past the patch unseen)."""
    given = {name: kwargs.pop(name) for name in CACHE_NAMES if kwargs.get(name) is not None}
    for name in CACHE_NAMES:
        kwargs.pop(name, None)
    if len(given) > 1:
        raise TypeError(f"the cache was passed both as {' and '.join(given)}; pass it once")
    stray = [name for name, value in kwargs.items() if isinstance(value, transformers.cache_utils.Cache)]
    if stray:
        raise TransformersVersionError(
            f"a cache arrived under the unknown argument name {stray[0]!r} under {version_note()}: duo attention "
            f"only knows {CACHE_NAMES} and refuses to run without seeing its cache"
        )
    return next(iter(given.values()), None)


def padding_mask_of(kwargs: dict[str, Any]) -> Any:
    """The 2-D padding mask of a forward call (generate passes a dict per layer type to models with layer_types)."""
    mask = kwargs.get("attention_mask")
    return mask.get("full_attention") if isinstance(mask, dict) else mask


GenerateCacheFactory = Callable[..., Any]  # (generation_config, model_kwargs, mode, batch, max_len) -> cache | None


def install_generate_cache(model: torch.nn.Module, factory: GenerateCacheFactory) -> None:
    """Let ``factory`` make the cache ``model.generate`` uses; where it returns None, transformers' own logic runs.

    The factory sees what transformers knows at that point (the generation config, the call's keyword arguments,
    the generation mode, the batch size before beam expansion and the largest cache length)."""
    original = type(model)._prepare_cache_for_generation
    name = cache_argument(model)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):  # fmt: skip
        cache = factory(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        if cache is None:
            return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        model_kwargs[name] = cache

    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)


def uninstall_generate_cache(model: torch.nn.Module) -> None:
    model.__dict__.pop("_prepare_cache_for_generation", None)


def user_cache_given(model: torch.nn.Module, model_kwargs: dict[str, Any]) -> bool:
    return model_kwargs.get(cache_argument(model)) is not None


def output_cache(outputs: Any) -> Any:
    """The cache a model output carries (field ``cache`` from 5.24, ``past_key_values`` before)."""
    names = {field.name for field in dataclasses.fields(outputs)}
    for name in CACHE_NAMES:
        if name in names:
            return getattr(outputs, name)
    raise TransformersVersionError(f"{type(outputs).__name__} has no cache field under {version_note()}")


def set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Non-reentrant activation checkpointing on or off (it acts in training mode only), under the installed
    version's name for it."""
    renamed = hasattr(model, "activation_checkpointing_enable")
    if not enabled:
        (model.activation_checkpointing_disable if renamed else model.gradient_checkpointing_disable)()
    elif renamed:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


HEAD_SHARDING_STYLE = "colwise"  # the tp_plan style under which each rank computes its own attention heads


def tensor_parallel_style(model: torch.nn.Module, module: torch.nn.Module) -> str | None:
    """The tensor-parallel style transformers applied to ``module`` (a submodule of ``model``); None when the model
    was not split by transformers' tensor parallelism or its plan leaves the module whole."""
    if (getattr(model, "tp_size", None) or 1) <= 1:
        return None
    name = next((name for name, candidate in model.named_modules() if candidate is module), None)
    if name is None:
        raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")
    generic = re.sub(r"\.\d+(?=\.|$)", ".*", name)  # the plan's spelling: model.layers.*.self_attn.k_proj
    plan = model.tp_plan or {}
    return plan.get(generic, plan.get(f"{generic}.weight"))


def warn_if_untested() -> None:
    """A version outside the tested range may still work; say that it was not proven."""
    if transformers_version() not in SpecifierSet(SUPPORTED_RANGE):
        warnings.warn(f"duo attention was not tested with {version_note()}", stacklevel=3)
