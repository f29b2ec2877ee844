"""Fine-tuning: the training loop, held-out evaluation, checkpoints, progress, plots and torchrun support."""

from .config import FinetuneConfig, target_module_list
from .evaluate import EvalResult, evaluate
from .finetune import FinetuneOutcome, run_finetune

__all__ = ["EvalResult", "FinetuneConfig", "FinetuneOutcome", "evaluate", "run_finetune", "target_module_list"]
