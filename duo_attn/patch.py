"""One-line DuoAttention for a loaded transformers model, through transformers' own extension points.

`enable_duo_attention_eval` registers the ``duo_attn`` attention and mask functions (``AttentionInterface`` /
``AttentionMaskInterface``), switches the model to them, attaches each layer's head layout to its attention module,
and adds a forward pre-hook on the base model that supplies a `DuoCache` whenever the model would otherwise create
(or receive from ``generate``) an empty default cache, and plans each forward pass on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.generation.configuration_utils import GenerationMode
from transformers.masking_utils import AttentionMaskInterface

from .attention import ATTENTION_NAME, ForwardFlags, LayerSpec, duo_attention_forward, duo_padding_mask
from .compat import (
    cache_argument,
    install_generate_cache,
    padding_mask_of,
    take_cache,
    uninstall_generate_cache,
    user_cache_given,
    warn_if_untested,
)
from .errors import DuoCacheError, ModelError, PatternError
from .heads import HeadLayout, can_permute_heads, permute_heads
from .kv_cache import DuoCache, StaticDuoCache
from .kv_quant import KVQuantSpec, resolve_kv_quant
from .masks import check_padding_mask
from .models import decoder_layers
from .patterns import (
    check_gates,
    check_pattern_fits,
    check_retrieval_floor,
    load_attn_pattern,
    sparsify_attention_heads,
)
from .placement import HeadShard, check_one_execution_device, head_shard

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_THRESHOLD = 0.5  # the original implementation's default when neither sparsity nor threshold is given

PatternLike = str | os.PathLike | tuple | np.ndarray | torch.Tensor | list


@dataclass
class DuoAttentionState:
    """What a patched model carries (``model.duo_attention``): the head mask, window sizes and how to undo it."""

    retrieval_mask: np.ndarray  # [layers, kv_heads] bool, True = retrieval head (the model's original head order)
    sink_size: int
    recent_size: int
    num_attention_heads: int  # query heads this process computes: all, or its tensor-parallel rank's block
    head_orders: list[np.ndarray] | None = None  # per layer, the permutation of this process's KV heads' weights
    cache_arg: str = "past_key_values"  # the name the base model's forward takes the cache under (compat.py)
    kv_quant: KVQuantSpec | None = None  # how the retrieval heads' cache is stored (None: the model dtype)
    head_dim: int | None = None  # the model's, to read a cache's kv_quant name as the patch read its own
    shard: HeadShard | None = None  # this rank's block of KV heads under tensor parallelism; None: every head
    installed: InstalledAttention | None = field(repr=False, default=None)
    static_capacity: int = 0  # the largest StaticDuoCache generate made: later calls reuse it (no new trace)
    forward: ForwardFlags = field(default_factory=ForwardFlags, repr=False)  # shared with every layer's spec
    local_mask: np.ndarray = field(init=False, repr=False)  # the mask of this process's KV heads
    cache_mask: np.ndarray = field(init=False, repr=False)  # local_mask in the heads' current order (see below)

    def __post_init__(self) -> None:
        self.local_mask = self.retrieval_mask if self.shard is None else self.shard.local_mask(self.retrieval_mask)
        # retrieval heads first once reordered; computed once, since every forward pass checks its cache against it
        self.cache_mask = (
            self.local_mask
            if self.head_orders is None
            else np.stack([row[order] for row, order in zip(self.local_mask, self.head_orders)])
        )

    @property
    def sparsity(self) -> float:
        """Fraction of KV heads that are streaming heads."""
        return float(1.0 - self.retrieval_mask.mean())

    def new_cache(self, capacity: int | None = None) -> DuoCache:
        """A dynamic cache, or with ``capacity`` a compileable `StaticDuoCache` for that many tokens."""
        heads = (self.cache_mask, self.sink_size, self.recent_size, self.num_attention_heads)
        if capacity is None:
            return DuoCache(*heads, kv_quant=self.kv_quant)
        return StaticDuoCache(*heads, capacity, kv_quant=self.kv_quant)


def resolve_pattern(
    pattern: PatternLike,
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    sink_size: int | None = None,
    recent_size: int | None = None,
    min_retrieval_per_layer: int = 0,
) -> tuple[np.ndarray, int, int]:
    """Any accepted pattern form -> ``(retrieval mask [L, H_kv] bool, sink_size, recent_size)``.

    A directory or a ``load_attn_pattern`` tuple holds gates: they are sparsified with ``sparsity`` or ``threshold``
    (default threshold 0.5), keeping ``min_retrieval_per_layer`` retrieval heads in every layer
    (`sparsify_attention_heads`). A bare array is taken as a 0/1 mask when it is binary and neither is given, else as
    gates; window sizes must then be passed explicitly. A mask is used as given: one below the floor is an error.
    """
    file_sink = file_recent = None
    if isinstance(pattern, (str, os.PathLike)):
        gates, file_sink, file_recent = load_attn_pattern(pattern)
    elif isinstance(pattern, tuple):
        if len(pattern) != 3:
            raise PatternError("a pattern tuple must be (gates, sink_size, recent_size) as load_attn_pattern returns")
        gates, file_sink, file_recent = pattern
        gates = np.asarray(gates, dtype=np.float64)
    else:
        gates = (pattern.detach().cpu().numpy() if isinstance(pattern, torch.Tensor) else np.asarray(pattern)).astype(
            np.float64
        )
    check_gates(gates, source="pattern")
    sink = sink_size if sink_size is not None else file_sink
    recent = recent_size if recent_size is not None else file_recent
    if sink is None or recent is None:
        raise PatternError("sink_size and recent_size are required when the pattern is a bare mask or gate array")
    for name, value in (("sink_size", sink), ("recent_size", recent)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise PatternError(f"{name} must be a non-negative integer, got {value!r}")
    if sink + recent == 0:
        raise PatternError("sink_size + recent_size must be positive")
    binary = bool(np.isin(gates, (0.0, 1.0)).all())
    floor = {"min_retrieval_per_layer": min_retrieval_per_layer}
    if sparsity is None and threshold is None and binary:
        mask = gates.astype(bool)
        check_retrieval_floor(mask, min_retrieval_per_layer)
    elif sparsity is None and threshold is None:
        mask = sparsify_attention_heads(gates, threshold=DEFAULT_THRESHOLD, **floor)[0]
    else:
        mask = sparsify_attention_heads(gates, sparsity=sparsity, threshold=threshold, **floor)[0]
    return mask, int(sink), int(recent)


def _check_model(model: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"duo attention supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; got {model_type!r} "
            f"({type(model).__name__})"
        )
    if not getattr(model, "_supports_attention_backend", False):
        raise ModelError(f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface")
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(kind != "full_attention" for kind in layer_types):
        raise ModelError(f"duo attention needs full-attention layers only; this model has layer types {set(layer_types)}")
    # Mistral applies config.sliding_window to every layer (it has no layer_types): a window the rule would ignore
    if model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        raise ModelError(
            f"this Mistral model attends within a sliding window of {config.sliding_window} tokens, which duo "
            "attention does not implement; set config.sliding_window = None only if the model was trained without it"
        )


class InstalledAttention:
    """An attention mode installed on a model by `install_attention`; `uninstall` undoes all of it."""

    def __init__(self, model: torch.nn.Module, name: str, attr: str, previous: str, hook: Any):
        self.model, self.name, self.attr, self.previous_implementation, self.hook = model, name, attr, previous, hook

    def uninstall(self) -> None:
        if self.hook is not None:
            self.hook.remove()
        for layer in decoder_layers(self.model):
            if hasattr(layer.self_attn, self.attr):
                delattr(layer.self_attn, self.attr)
        self.model.set_attn_implementation(self.previous_implementation)
        del self.model.duo_attention_mode


def install_attention(
    model: torch.nn.Module,
    name: str,
    function: Callable,
    *,
    attr: str,
    layer_state: Callable[[int], Any],
    mask_function: Callable | None = None,
    pre_hook: Callable | None = None,
) -> InstalledAttention:
    """Install one attention mode (inference, training's gated mix, scoring's recorder) the same way for all: register
    ``function`` (and ``mask_function``) under ``name`` with transformers, attach ``layer_state(layer_index)`` to each
    attention module as ``attr``, switch the model to ``name``, and add ``pre_hook`` to the base model. One mode at a
    time: a second install is refused until the first is uninstalled."""
    current = getattr(model, "duo_attention_mode", None)
    if current is not None:
        raise ModelError(f"attention mode {current.name!r} is installed on this model; uninstall it first")
    layers = decoder_layers(model)
    AttentionInterface.register(name, function)
    if mask_function is not None:
        AttentionMaskInterface.register(name, mask_function)
    for index, layer in enumerate(layers):
        setattr(layer.self_attn, attr, layer_state(index))
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    base = getattr(model, "base_model", model)
    hook = None if pre_hook is None else base.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model.duo_attention_mode = InstalledAttention(model, name, attr, previous, hook)
    return model.duo_attention_mode


def enable_duo_attention_eval(
    model: torch.nn.Module,
    pattern: PatternLike,
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    sink_size: int | None = None,
    recent_size: int | None = None,
    reorder_heads: bool = True,
    compile_generate: bool = True,
    kv_quant: str | KVQuantSpec | None = None,
    min_retrieval_per_layer: int = 0,
) -> DuoAttentionState:
    """Patch ``model`` in place for DuoAttention inference; ``model(...)`` and ``model.generate(...)`` then use it.

    ``pattern``: a pattern directory, the tuple from `load_attn_pattern`, or a ``[layers, kv_heads]`` 0/1 mask
    (1 = retrieval head). Everything is validated before the model is touched. Calling it again replaces the pattern;
    `disable_duo_attention` restores the original model.

    A model split by transformers' tensor parallelism is patched on every rank with the same (whole-model) pattern:
    each rank's `DuoCache` and layouts cover only the KV heads it computes (placement.py). Modules offloaded by an
    accelerate ``device_map`` work; a map that runs layers on several devices is refused.

    ``reorder_heads``: permute each layer's projection weights so that its retrieval heads come first (the model's
    outputs do not change). Each head group is then a contiguous slice: no gathers and no merge per layer and step.
    Under tensor parallelism each rank permutes its own heads only (the split between ranks is transformers').
    Layers whose projections are not plain linear layers, or are offloaded, keep their order (their heads are
    gathered into groups and merged back at every step). Undone by `disable_duo_attention`.

    ``compile_generate``: wherever transformers' ``generate`` would compile its decode step (on CUDA by default; with
    ``cache_implementation="static"`` anywhere), it gets a `StaticDuoCache` sized for the call, so its steps run
    compiled (CUDA graphs in transformers' default reduce-overhead mode). ``False``: ``generate`` always decodes
    eagerly on the dynamic `DuoCache`. Per call, ``disable_compile=True`` does the same.

    ``kv_quant``: ``None`` (the model dtype), ``"int8"``, ``"int4"`` or ``"fp8"`` (optionally with a group,
    ``"int4-g32"``; default 32 channels, or its gcd with head_dim): the retrieval heads' cache, the part that grows,
    is stored quantized (docs/kv_quant.md); streaming heads stay in the model dtype. A kind the model's head_dim or
    device cannot take (int4 with an odd head_dim, fp8 on a GPU below compute capability 8.9) raises ``ValueError``
    before the model is touched.

    ``min_retrieval_per_layer``: gates are sparsified keeping at least that many retrieval heads in every layer (the
    layer's highest gates; `sparsify_attention_heads`), so that no layer loses the whole context. A 0/1 mask is used
    as given, and one with a layer below the floor is refused.
    """
    _check_model(model)
    mode = getattr(model, "duo_attention_mode", None)
    if mode is not None and mode.name != ATTENTION_NAME:
        raise ModelError(f"attention mode {mode.name!r} is installed on this model; uninstall it first")
    cache_arg = cache_argument(getattr(model, "base_model", model))
    warn_if_untested()
    mask, sink, recent = resolve_pattern(
        pattern, sparsity=sparsity, threshold=threshold, sink_size=sink_size, recent_size=recent_size,
        min_retrieval_per_layer=min_retrieval_per_layer,
    )  # fmt: skip
    config = model.config
    check_pattern_fits(mask, config.num_hidden_layers, config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    spec = resolve_kv_quant(kv_quant, head_dim, model.device)
    layers = decoder_layers(model)
    check_one_execution_device(model)
    shard = head_shard(model, layers)
    ranks = 1 if shard is None else shard.world_size
    num_q, num_kv = config.num_attention_heads // ranks, config.num_key_value_heads // ranks

    if getattr(model, "duo_attention", None) is not None:
        disable_duo_attention(model)
    local_mask = mask if shard is None else shard.local_mask(mask)
    head_orders = None
    if reorder_heads and all(can_permute_heads(layer.self_attn, num_q, num_kv) for layer in layers):
        head_orders = [np.concatenate([np.flatnonzero(row), np.flatnonzero(~row)]) for row in local_mask]
    state = DuoAttentionState(
        mask, sink, recent, num_q, head_orders, cache_arg, kv_quant=spec, head_dim=head_dim, shard=shard
    )
    specs = [LayerSpec(HeadLayout.from_mask(row, num_q), sink, recent, state.forward) for row in state.cache_mask]
    state.installed = install_attention(
        model, ATTENTION_NAME, duo_attention_forward, attr="duo_layer_spec", layer_state=specs.__getitem__,
        mask_function=duo_padding_mask, pre_hook=_prepare_duo_cache(state),
    )  # fmt: skip
    groups = config.num_attention_heads // config.num_key_value_heads
    for layer, order in zip(layers, head_orders or []):
        permute_heads(layer.self_attn, order, groups)
    if compile_generate:
        install_generate_cache(model, _static_cache_for_generate(model, state))
    model.duo_attention = state
    return state


def disable_duo_attention(model: torch.nn.Module) -> None:
    """Undo `enable_duo_attention_eval`: original head order and attention implementation, no hook, no layouts."""
    state = getattr(model, "duo_attention", None)
    if state is None:
        raise ModelError("duo attention is not enabled on this model")
    if state.head_orders is not None:
        groups = state.num_attention_heads // state.local_mask.shape[1]
        for layer, order in zip(decoder_layers(model), state.head_orders):
            permute_heads(layer.self_attn, np.argsort(order), groups)
    state.installed.uninstall()
    uninstall_generate_cache(model)
    del model.duo_attention


COMPILED_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)  # the modes whose step generate compiles
STATIC_MODES = (*COMPILED_MODES, GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE)  # cache_implementation="static"
COMPILE_DEVICES = ("cuda", "xpu")  # where transformers auto-compiles (its list also has neuron/tpu; not supported)


def _static_cache_for_generate(model: torch.nn.Module, state: DuoAttentionState):
    """generate's cache factory: a `StaticDuoCache` where generate would compile with one (or was asked for a static
    cache); None leaves the call to transformers (then the pre-hook supplies a dynamic DuoCache)."""

    def factory(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        implementation = generation_config.cache_implementation
        if user_cache_given(model, model_kwargs) or generation_config.use_cache is False:
            return None
        if implementation not in (None, "static") or generation_mode not in STATIC_MODES:
            return None
        if implementation is None:
            if generation_mode not in COMPILED_MODES:  # beam search runs eagerly: the dynamic cache serves it
                return None
            if state.shard is not None:  # a compiled step with tensor-parallel collectives is untried: stay eager
                return None
            compile_config = generation_config.compile_config
            compiles = model.device.type in COMPILE_DEVICES or bool(
                compile_config is not None and compile_config._compile_all_devices
            )
            if generation_config.disable_compile or not compiles:
                return None
        # one capacity across calls (the largest so far): a new size would trace the compiled step again
        state.static_capacity = max(max_cache_length, generation_config.max_cache_len or 0, state.static_capacity)
        cache = state.new_cache(state.static_capacity)
        if getattr(generation_config, "prefill_chunk_size", None) is not None:  # generate compiles the pre-fill too
            rows = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) * batch_size
            cache.early_initialization(rows, int(state.cache_mask.shape[1]), state.head_dim, model.dtype,
                                       model.device)  # fmt: skip
        return cache

    return factory


def _prepare_duo_cache(state: DuoAttentionState):
    """Forward pre-hook: supply a DuoCache where the model would use a fresh default cache, then plan the step.

    Any other cache is refused: the patched model either keeps its keys and values in a DuoCache or does not run.
    """

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        padding_mask = padding_mask_of(kwargs)
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs["inputs_embeds"]
        check_padding_mask(padding_mask, inputs.shape[1], inputs.shape[0])
        cache = take_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        if cache is None and use_cache and not (module.training and getattr(module, "gradient_checkpointing", False)):
            cache = state.new_cache()
        elif type(cache) is DynamicCache and cache.get_seq_length() == 0 and not getattr(cache, "offloading", False):
            cache = state.new_cache()  # generate()'s default cache, still empty (an offloaded one is refused below)
        elif cache is not None and not isinstance(cache, DuoCache):
            raise DuoCacheError(
                f"a duo-attention model got a {type(cache).__name__}: its keys and values must live in a DuoCache. "
                "Pass no cache (one is made), an empty DynamicCache, or DuoCache.for_model(model); generate()'s "
                "cache_implementation options other than the default are not supported"
            )
        state.forward.cached = cache is not None
        if cache is not None:
            mask = cache.retrieval_mask
            same_heads = mask is state.cache_mask or np.array_equal(mask, state.cache_mask)  # identity: our caches
            if not same_heads or (cache.sink_size, cache.recent_size) != (state.sink_size, state.recent_size):
                raise DuoCacheError(
                    "this DuoCache was built for another pattern or head order; make it with DuoCache.for_model(model)"
                )
            _check_kv_quant(cache, state)
            step = cache.begin_step(padding_mask, inputs.shape[1], inputs.shape[0], inputs.device)
            if kwargs.get("position_ids") is None and step.position_ids is not None:
                kwargs["position_ids"] = step.position_ids
        kwargs[state.cache_arg] = cache
        return args, kwargs

    return hook


def _check_kv_quant(cache: DuoCache, state: DuoAttentionState) -> None:
    """Refuse a cache whose retrieval heads are stored otherwise than the model was patched for (a name is read with
    the model's head_dim, as the patch read its own)."""

    if cache.kv_quant is state.kv_quant:  # identity: a cache the state made (checked at every forward pass)
        return

    def described(spec: KVQuantSpec | None) -> str:
        return "the model dtype (kv_quant=None)" if spec is None else f"kv_quant={spec.name!r}"

    try:
        spec = resolve_kv_quant(cache.kv_quant, state.head_dim)
    except ValueError as err:
        raise DuoCacheError(f"this DuoCache's kv_quant={cache.kv_quant!r} does not fit the model: {err}") from err
    if spec != state.kv_quant:
        raise DuoCacheError(
            f"this DuoCache stores retrieval heads as {described(spec)}, but the model was patched for "
            f"{described(state.kv_quant)}; make the cache with DuoCache.for_model(model)"
        )
