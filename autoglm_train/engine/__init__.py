"""The generation engine that training-time evaluation, the eval tools and the server share.

Requests in, tokens out: a bundle (or modules in memory) is loaded (:mod:`.loading`), its plugins routed by
modality and built on first use (:mod:`.plugins`), every running sequence decoded together over a KV cache
(:mod:`.scheduler`, :mod:`.runner`), sampled (:mod:`.sampling`) and detokenized (:mod:`.detokenize`); prompts that
only want their log-probs (a distillation teacher's top-k) are scored together in one forward (:mod:`.prompt_logprobs`).
It imports no web framework and raises its own exceptions (:mod:`.errors`); the HTTP layer
(``autoglm_train.serve``) maps them to status codes, as vLLM's engine knows nothing of its entrypoints.
"""

from autoglm_train.engine.bundle import BundleInfo, read_bundle
from autoglm_train.engine.engine import Engine
from autoglm_train.engine.errors import EngineError, InvalidRequest, PluginUnavailable
from autoglm_train.engine.sampling import SamplingParams
from autoglm_train.engine.scheduler import Delta, Prompt, PromptScores

__all__ = [
    "BundleInfo",
    "Delta",
    "Engine",
    "EngineError",
    "InvalidRequest",
    "PluginUnavailable",
    "Prompt",
    "PromptScores",
    "SamplingParams",
    "read_bundle",
]
