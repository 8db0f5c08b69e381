"""The training harness on megatron-core: ``train(cfg)``, ``evaluate(...)``, ``longsky train``."""

from megatron_longsky.training.config import TrainConfig, load_train_config, train_config_from_dict

__all__ = ["TrainConfig", "load_train_config", "train_config_from_dict", "train", "evaluate", "TrainResult"]


def __getattr__(name):
    # The loop pulls in megatron-core; import it only when used.
    if name in ("train", "evaluate", "TrainResult", "NonFiniteLossError"):
        from megatron_longsky.training import loop

        return getattr(loop, name)
    raise AttributeError(name)
