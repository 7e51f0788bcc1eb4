"""Model families: one module per architecture family, registered by the HF ``model_type``
values it serves. ``family_for(config)`` finds the one for a checkpoint.

Adding an architecture = one module here (a :class:`Family` subclass overriding only what
differs from the llama-like base) + its import below + its tests (README, "Adding a model
family").
"""

from qtool.models import (  # noqa: F401  (registration)
    gemma2,
    gemma3,
    gpt_oss,
    granite,
    llama,
    mixtral,
    olmo2,
    phi3,
    qwen,
    qwen_moe,
    smollm3,
)
from qtool.models.base import Family, GenericFamily, GGUFTensor, family_for, supported

__all__ = ["Family", "GGUFTensor", "GenericFamily", "family_for", "supported"]
