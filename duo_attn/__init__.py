"""DuoAttention for HuggingFace transformers: retrieval heads keep a full KV cache, streaming heads sink + recent."""

from .errors import DuoCacheError, ModelError, PatternError, TransformersVersionError
from .kv_cache import DuoCache, StaticDuoCache
from .patch import disable_duo_attention, enable_duo_attention_eval
from .patterns import load_attn_pattern, save_attn_pattern, sparsify_attention_heads

__all__ = [
    "DuoCache",
    "DuoCacheError",
    "ModelError",
    "PatternError",
    "StaticDuoCache",
    "TransformersVersionError",
    "disable_duo_attention",
    "enable_duo_attention_eval",
    "load_attn_pattern",
    "save_attn_pattern",
    "sparsify_attention_heads",
]
__version__ = "0.1.0"
