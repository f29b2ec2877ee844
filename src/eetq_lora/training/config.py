"""The settings of a fine-tuning run, their defaults and their checks."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import ConfigError

# Settings that may differ when a run is resumed: where it runs, not what it computes.
RUNTIME_ONLY = ("device", "threads")

# (setting, lowest, highest) of the whole-number settings. The upper bounds only catch typos and
# overflows: the seed is also mixed into 64-bit generator seeds, and the others size tensors or loops.
INT_RANGES = (
    ("steps", 1, 10_000_000),
    ("r", 1, 65_536),
    ("max_seq_len", 8, 1_048_576),
    ("batch_size", 1, 1_000_000),
    ("grad_accum", 1, 1_000_000),
    ("seed", 0, 2**32 - 1),
    ("eval_examples", 1, 100_000_000),
    ("threads", 1, 4096),
)
# (setting, lowest, highest, lowest excluded, highest excluded, why) of the real-number settings.
# AdamW moves every LoRA weight by about the learning rate each step, so a rate above 1 only
# diverges; an alpha above 10,000 (a scale of alpha/r on the update) does the same.
FLOAT_RANGES = (
    ("lr", 0.0, 1.0, True, False, " (LoRA usually trains with 1e-5 to 1e-2)"),
    ("alpha", 0.0, 10_000.0, True, False, " (the update is scaled by alpha/r; usually r to 2r)"),
    ("dropout", 0.0, 1.0, False, True, " (a probability; 0 for none)"),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _finite_number(value) -> float | None:
    """``value`` as a float when it is a finite int or float (not a bool, string or NaN/inf); else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass
class FinetuneConfig:
    """Everything that determines a fine-tuning run. ``model``/``data`` None mean the built-in ones.

    ``fsdp`` shards the model over torchrun's processes instead of replicating it (DDP); it is
    kept with the run because its checkpoints differ, not its results.
    """

    model: str | None = None
    data: str = "builtin"
    eval_data: str | None = None
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

    def __post_init__(self) -> None:
        if self.data is None:  # runs saved before the built-in data had a name
            self.data = "builtin"

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first setting out of range and the range it must be in."""
        for name, low, high in INT_RANGES:
            value = getattr(self, name)
            if value is None and name == "threads":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{_flag(name)} must be a whole number from {low:,} to {high:,}, got {value!r}")
        for name, low, high, low_open, high_open, why in FLOAT_RANGES:
            value = getattr(self, name)
            number = _finite_number(value)
            if (
                number is None
                or number < low
                or number > high
                or (low_open and number == low)
                or (high_open and number == high)
            ):
                bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                raise ConfigError(f"{_flag(name)} must be a number in {bounds}{why}, got {value!r}")
        if not isinstance(self.target_modules, str) or not target_module_list(self.target_modules):
            raise ConfigError("--target-modules must name at least one module (or be all-linear)")

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
