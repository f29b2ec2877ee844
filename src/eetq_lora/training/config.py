"""The settings of a fine-tuning run, their defaults and their checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import ConfigError

# Settings that may differ when a run is resumed: where it runs, not what it computes.
RUNTIME_ONLY = ("device", "threads")


@dataclass
class FinetuneConfig:
    """Everything that determines a fine-tuning run. ``model``/``data`` None mean the built-in ones.

    ``fsdp`` shards the model over torchrun's processes instead of replicating it (DDP); it is
    kept with the run because its checkpoints differ, not its results.
    """

    model: str | None = None
    data: str | None = None
    steps: int = 60
    lr: float = 1e-3
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = "all-linear"
    max_seq_len: int = 96
    batch_size: int = 8
    grad_accum: int = 1
    dtype: str = "auto"
    seed: int = 0
    eval_examples: int = 128
    device: str = "auto"
    threads: int | None = None
    fsdp: bool = False

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first setting out of range."""
        checks = [
            (self.steps >= 1, "--steps must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (self.r >= 1, "--r (the LoRA rank) must be at least 1"),
            (self.alpha > 0, "--alpha must be positive"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.max_seq_len >= 8, "--max-seq-len must be at least 8"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.eval_examples >= 1, "--eval-examples must be at least 1"),
            (self.threads is None or self.threads >= 1, "--threads must be at least 1"),
            (bool(target_module_list(self.target_modules)), "--target-modules must name at least one module"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def differences(self, other: "FinetuneConfig") -> list[str]:
        """Names of the settings (other than runtime-only ones) whose values differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k not in RUNTIME_ONLY and mine[k] != theirs[k]]


def target_module_list(value: str) -> str | list[str]:
    """``"all-linear"`` stays as is; ``"q_proj, v_proj"`` becomes ``["q_proj", "v_proj"]``."""
    if value.strip().lower() == "all-linear":
        return "all-linear"
    return [name.strip() for name in value.split(",") if name.strip()]
