from megatron_longsky.model.config import ModelConfig, RopeConfig, model_config_from_dict, preset
from megatron_longsky.model.build import build_model, transformer_config
from megatron_longsky.model.init import initialize_weights

__all__ = [
    "ModelConfig", "RopeConfig", "model_config_from_dict", "preset", "build_model", "transformer_config",
    "initialize_weights",
]
