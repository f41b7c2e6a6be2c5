"""Loading models (packaged, zoo, local, GGUF) and mapping them onto canonical sites."""

from model_forensics.models.adapters import Adapter, adapter_for
from model_forensics.models.loading import LoadedModel, ModelRef, load, model_ref, weights_sha256

__all__ = ["Adapter", "LoadedModel", "ModelRef", "adapter_for", "load", "model_ref", "weights_sha256"]
