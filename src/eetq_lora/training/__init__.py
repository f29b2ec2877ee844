"""Fine-tuning: the training loop, held-out evaluation, checkpoints, progress, plots and torchrun support."""

from .config import FinetuneConfig, target_module_list
from .evaluate import EvalResult, evaluate
from .finetune import FinetuneOutcome, run_finetune
from .recompute import recompute_cheap_ops

__all__ = [
    "EvalResult",
    "FinetuneConfig",
    "FinetuneOutcome",
    "evaluate",
    "recompute_cheap_ops",
    "run_finetune",
    "target_module_list",
]
