"""Policies: the tiny test model, the embedded SmolLM2 default, model specs, response log-probs."""

from recpipe.models.cache import cache_root
from recpipe.models.load import BUILTIN_MODELS, resolve_model
from recpipe.models.logprobs import apply_top_p, response_logprobs, sampled_token_logprobs
from recpipe.models.smollm2 import ModelNotFound, smollm2_checkpoint, smollm2_gguf_path
from recpipe.models.tiny import build_tiny_model

__all__ = [
    "BUILTIN_MODELS",
    "ModelNotFound",
    "apply_top_p",
    "build_tiny_model",
    "cache_root",
    "response_logprobs",
    "resolve_model",
    "sampled_token_logprobs",
    "smollm2_checkpoint",
    "smollm2_gguf_path",
]
