from megatron_longsky.checkpoint.layout import (
    ITERATION_PREFIX,
    clean_checkpoint_root,
    iteration_dir,
    list_iterations,
    prune_checkpoints,
    read_checkpoint_config,
    read_latest,
    resolve_checkpoint,
    write_checkpoint_config,
    write_latest,
)
from megatron_longsky.checkpoint.model_io import load_model_weights, save_model_weights

__all__ = [
    "ITERATION_PREFIX", "clean_checkpoint_root", "iteration_dir", "list_iterations", "prune_checkpoints",
    "read_checkpoint_config", "read_latest", "resolve_checkpoint", "write_checkpoint_config",
    "write_latest", "load_model_weights", "save_model_weights",
]
