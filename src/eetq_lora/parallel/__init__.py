"""Scale-out: the int8 base sharded by the field's engines (FSDP2, ZeRO-3) with exact LoRA gradients."""

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
    "check_shardable",
    "decoder_layers",
    "Zero3Error",
    "explain_fsdp1_refusal",
    "gathered_adapter_state_dict",
    "gathered_state_dict",
    "is_partitioned",
    "load_sharded",
    "local_int8_bytes",
    "shard_model",
    "unwrap_model",
]
