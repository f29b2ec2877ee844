"""Scale-out: the int8 base sharded by the field's engines (FSDP2, ZeRO-3) with exact LoRA gradients."""

from .checkpoint import TrainingStateError, load_training_state, save_sharded_adapter, save_training_state
from .fsdp import (
    ShardingError,
    check_shardable,
    decoder_layers,
    explain_fsdp1_refusal,
    local_int8_bytes,
    shard_model,
    unwrap_model,
)
from .loading import load_sharded
from .zero3 import Zero3Error, gathered_adapter_state_dict, gathered_state_dict, is_partitioned

explain_fsdp1_refusal()

__all__ = [
    "ShardingError",
    "TrainingStateError",
    "check_shardable",
    "decoder_layers",
    "Zero3Error",
    "explain_fsdp1_refusal",
    "gathered_adapter_state_dict",
    "gathered_state_dict",
    "is_partitioned",
    "load_sharded",
    "load_training_state",
    "local_int8_bytes",
    "save_sharded_adapter",
    "save_training_state",
    "shard_model",
    "unwrap_model",
]
