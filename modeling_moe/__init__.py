"""modeling-moe: DeepSeek-style Mixture-of-Experts language models for the Hugging Face stack.

Importing the package registers the classes with transformers' Auto classes, and marks them for export so that
`save_pretrained` writes the modeling code next to the weights (loadable with `trust_remote_code=True`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from . import presets
from .configuration_moe import MoEConfig
from .modeling_moe import MoEForCausalLM, MoEModel, MoEPreTrainedModel
from .speculative import mtp_speculative_decoding

AutoConfig.register(MoEConfig.model_type, MoEConfig, exist_ok=True)
AutoModel.register(MoEConfig, MoEModel, exist_ok=True)
AutoModelForCausalLM.register(MoEConfig, MoEForCausalLM, exist_ok=True)
MoEConfig.register_for_auto_class()
MoEModel.register_for_auto_class("AutoModel")
MoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MoEConfig", "MoEModel", "MoEForCausalLM", "MoEPreTrainedModel", "mtp_speculative_decoding", "presets"]
__version__ = "0.1.0"
