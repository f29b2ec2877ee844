"""The whole fine-tuning job: data, quantized model, LoRA, held-out scores, training, outputs."""

from __future__ import annotations

import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import (
    Encoded,
    EncodedSet,
    PromptFormat,
    collate,
    encode_examples,
    load_dataset,
    load_eval_dataset,
    supervised_tokens,
    training_split,
)
from ..errors import DataError, UserError
from ..files import (
    FolderLock,
    disk_size,
    find_leftovers,
    format_size,
    public_file_mode,
    remove_path,
    replace_folder,
    restore_replaced,
    write_json_atomic,
)
from ..models import check_model_spec, default_device, load_quantized, resolve_dtype, resolve_model
from .checkpoint import (
    CHECKPOINT_DIR,
    RUN_CONFIG,
    checkpoint_path,
    find_resumable,
    read_state,
    restore_optimizer_and_rng,
    restore_sharded_state,
    save_checkpoint,
    save_sharded_checkpoint,
    staging_path,
)
from .config import FinetuneConfig, target_module_list
from .distributed import DistContext, check_sharding_possible, context_from_env, init_distributed, shutdown_distributed
from .evaluate import EvalResult, evaluate
from .interrupt import StopRequest
from .loss import answer_token_stats
from .lr import learning_rate
from .plot import plotting_available, save_loss_plot
from .progress import TrainingProgress
from .recompute import recompute_cheap_ops
from .schedule import BatchSchedule, micro_batches

METRICS = "metrics.json"
LOSS_PLOT = "loss.png"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
OUTPUT_NAMES = (*ADAPTER_FILES, METRICS, LOSS_PLOT, RUN_CONFIG, CHECKPOINT_DIR)
CHECKPOINT_EVERY = 50
MAX_GRAD_NORM = 1.0

Log = Callable[[str], None]


@dataclass
class FinetuneOutcome:
    """``status`` is "finished" or "interrupted"; ``metrics`` is what metrics.json holds (finished runs);
    ``checkpoint`` is the folder an interrupted run resumes from."""

    status: str
    step: int
    total_steps: int
    out: Path
    metrics: dict | None = None
    is_main: bool = True
    checkpoint: Path | None = None


class TrainingDiverged(UserError):
    """The training loss or gradient turned NaN or infinite; the run stopped before applying that step."""


class RunAborted(KeyboardInterrupt):
    """Ctrl-C stopped the run at once (not at a step boundary) after it had saved a checkpoint."""

    def __init__(self, checkpoint: Path, step: int) -> None:
        super().__init__(f"aborted; the last checkpoint (step {step}) is in {checkpoint}")
        self.checkpoint = checkpoint
        self.step = step


class _NonFinite(Exception):
    def __init__(self, what: str, value: float) -> None:
        super().__init__(f"the {what} is {value}")


@dataclass
class _Saved:
    """The step of the last checkpoint in the run's staging folder (None: this run has saved nothing)."""

    staging: Path
    step: int | None = None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def output_folder(out: str | os.PathLike) -> Path:
    """``--out`` as a path whose last part names the folder (a link to a folder is followed, since the
    folder is replaced whole); refuse the root and the current folder."""
    path = Path(os.path.normpath(os.path.expanduser(os.fspath(out))))
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.name in ("", ".", ".."):
        path = Path(os.path.abspath(path))
    if not path.name:
        raise UserError(f"--out {out} is the root folder; pass a folder for the results, such as runs/finetune")
    here = Path.cwd().resolve()
    target = path.resolve()
    if target == here or target in here.parents:
        raise UserError(
            f"--out {out} is the current folder or holds it, but the results replace --out as a whole folder; "
            "pass a subfolder, such as runs/finetune"
        )
    return path


def tidy_output(out: Path, log: Log) -> None:
    """Undo what a killed run left behind around ``out``; call it holding ``out``'s lock.

    A run killed in the middle of replacing ``out`` may have left it missing with the old copy
    hidden next to it: that copy is put back. Hidden temporary files and folders of killed writes
    (next to ``out``, in it and in its staging folder) are removed, one line each.
    """
    restored = restore_replaced(out)
    if restored is not None:
        log(f"Restored {out} from {restored.name}, where a run killed while replacing it had left it")
    staging = staging_path(out)
    leftovers = [*find_leftovers(out.parent, out.name), *find_leftovers(out.parent, staging.name)]
    for folder in (out, staging):
        if folder.is_dir() and not folder.is_symlink():
            leftovers += find_leftovers(folder)
            # PEFT adapters are saved through a tempfile folder named .adapter.XXXXXXXX.
            leftovers += find_leftovers(folder, "adapter", ("",))
    for path in leftovers:
        size = disk_size(path)
        remove_path(path)
        log(f"Removed {path} ({format_size(size)}), left by an interrupted run")


def check_output(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to clobber an existing output folder or an unfinished run; for a resume, return the folder
    it continues (the staging folder, else ``out``). Call it holding ``out``'s lock."""
    if resume:
        if overwrite:
            raise UserError("--resume continues the run saved in --out and --overwrite replaces it; pass only one")
        source = find_resumable(out)
        if source is None:
            raise _nothing_to_resume(out)
        return source
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder path")
    staging = staging_path(out)
    if staging.exists() and not overwrite:
        state = read_state(staging)
        progress = f" at step {state['step']}" if state else ""
        raise UserError(
            f"an unfinished run for {out} is saved in {staging}{progress}; pass --resume to continue it, "
            "--overwrite to start again (it is replaced once the new run saves a checkpoint), or a different --out"
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"output folder {out} already exists and is not empty; pass --overwrite to replace its results, "
            f"--resume to continue the run saved there, or a different --out"
        )
    return None


def _nothing_to_resume(out: Path) -> UserError:
    return UserError(
        f"nothing to resume for {out}: neither it nor {staging_path(out)} holds {RUN_CONFIG} and "
        f"{CHECKPOINT_DIR}/ from an earlier run"
    )


def _carry(source: Path, destination: Path) -> None:
    """Copy a file, link or folder, hard-linking files where the filesystem allows (no bytes copied)."""

    def link_or_copy(src, dst) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_symlink():
        os.symlink(os.readlink(source), destination)
    elif source.is_dir():
        shutil.copytree(source, destination, symlinks=True, copy_function=link_or_copy)
    else:
        link_or_copy(source, destination)


def publish_results(staging: Path, out: Path) -> None:
    """Make the finished run in ``staging`` the folder ``out`` in one swap.

    Files of ``out`` that no run writes (notes of your own, say) are carried over first, so only
    our results are replaced. Killed at any point, ``out`` holds the old results or the new ones
    (or, between the two renames, is restored by the next run's ``tidy_output``).
    """
    if out.is_dir():
        for entry in out.iterdir():
            if entry.name not in OUTPUT_NAMES and not (staging / entry.name).exists():
                _carry(entry, staging / entry.name)
    try:
        replace_folder(staging, out)
    except OSError as error:
        raise UserError(
            f"could not move the finished run from {staging} to {out} ({error}); {out} is as it was, and "
            "--resume moves it once the problem is fixed"
        ) from None


def load_run_config(folder: Path) -> FinetuneConfig:
    """The settings saved in ``folder``'s run_config.json."""
    import json

    return FinetuneConfig.from_dict(json.loads((folder / RUN_CONFIG).read_text())["settings"])


def _on_main(context: DistContext, decide: Callable[[], object]) -> object:
    """Run ``decide()`` on rank 0 only and return its result on every process; its UserError is raised on all."""
    if not context.enabled:
        return decide()
    import torch.distributed as dist

    box: list = [None]
    error: UserError | None = None
    if context.is_main:
        try:
            box[0] = ("ok", decide())
        except UserError as caught:
            error = caught
            box[0] = ("error", str(caught))
        except Exception:
            box[0] = ("error", "process 0 could not prepare --out; see its error")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def configure_threads(requested: int | None, context: DistContext) -> int:
    """Use ``requested`` threads; else share torch's default (one per core) among this machine's processes."""
    if requested:
        torch.set_num_threads(requested)
    elif "OMP_NUM_THREADS" not in os.environ and context.local_world_size > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // context.local_world_size))
    return torch.get_num_threads()


def warn_if_busy(log: Log) -> None:
    """Say so when other programs already keep the CPUs busy: threads that wait on each other then
    slow to a crawl, and one thread per process is usually much faster."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return
    cores = os.cpu_count() or 1
    if load >= 0.75 * cores:
        log(
            f"Note: this machine is already busy (load {load:.1f} on {cores} CPUs); "
            "if training crawls, pass --threads 1."
        )


def save_adapter(peft_model, folder: Path) -> None:
    """Save the PEFT adapter files into ``folder`` (a staging folder: they become visible with it, together)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", suffix=".tmp", dir=folder))
    try:
        peft_model.save_pretrained(tmp)
        for name in ADAPTER_FILES:
            os.chmod(tmp / name, public_file_mode())
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_linear(module: torch.nn.Module) -> bool:
    from .. import EetqLinear

    return isinstance(module, (torch.nn.Linear, EetqLinear))


def peak_memory_bytes() -> int:
    """This process's peak resident memory so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from .. import __version__

    return {
        "eetq_lora": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def _encode(fmt: PromptFormat, examples, config: FinetuneConfig, what: str, source: str) -> EncodedSet:
    encoded = encode_examples(fmt, examples, config.max_seq_len)
    if not encoded.items:
        raise DataError(
            f"none of the {len(examples)} {what} example(s) of {source} fits in --max-seq-len {config.max_seq_len} "
            "tokens with room for an answer; raise --max-seq-len"
        )
    return encoded


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def evaluate_sharded(
    model: torch.nn.Module, items: list[Encoded], batch_size: int, pad_id: int, device, context: DistContext
) -> EvalResult:
    """``evaluate`` for a model sharded over the processes, with the same batches and the same result.

    Every forward gathers weights from all processes, so each process runs as many forwards as
    the one with the most batches; the extra ones repeat a batch and count nothing.
    """
    shares = [items[rank :: context.world_size] for rank in range(context.world_size)]
    batch_counts = [-(-len(share) // batch_size) for share in shares]
    mine = sorted(shares[context.rank], key=lambda item: len(item.input_ids))
    batches = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    idle = max(batch_counts) - len(batches)
    was_training = model.training
    model.eval()
    nll = tokens = correct = 0.0
    with torch.no_grad():
        for index, part in enumerate(batches + [items[:1]] * idle):
            batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
            stats = answer_token_stats(model, batch)
            if index < len(batches):
                nll += float(stats.nll)
                tokens += stats.tokens
                correct += stats.correct
    model.train(was_training)
    nll, tokens, correct = context.sum([nll, tokens, correct], device)
    return EvalResult(loss=nll / tokens, accuracy=correct / tokens, tokens=int(tokens), examples=len(items))


class _Trainer:
    """One optimizer step at a time over the schedule; each step's loss is the global mean per answer token."""

    def __init__(
        self,
        model,
        train_model,
        optimizer,
        train_set: EncodedSet,
        schedule: BatchSchedule,
        config,
        context,
        device,
        pad_id,
    ) -> None:
        self.model = model
        self.train_model = train_model
        self.optimizer = optimizer
        self.items = train_set.items
        self.answer_tokens = [supervised_tokens(item) for item in self.items]
        self.config = config
        self.context = context
        self.device = device
        self.pad_id = pad_id
        self.schedule = schedule
        self.parameters = [p for p in model.parameters() if p.requires_grad]

    def _gradient_sync(self, last: bool):
        """Combine gradients over processes only in the backward of a step's last micro-batch."""
        if not self.context.enabled:
            return nullcontext()
        if self.config.fsdp:
            # FSDP2 modules have no no_sync(); this flag holds until it is set again.
            self.train_model.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last else self.train_model.no_sync()

    def step(self, step: int, stop_requested: bool) -> tuple[float, int, bool]:
        """Run optimizer step ``step``; returns (loss, tokens processed by all processes, stop agreed).

        A loss or gradient norm that is NaN or infinite raises _NonFinite before the update is applied.
        """
        config, context = self.config, self.context
        rate = learning_rate(step, config.steps, config.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        batch_indices = self.schedule.global_batch_at(step)
        global_tokens = sum(self.answer_tokens[i] for i in batch_indices)
        parts = micro_batches(batch_indices, context.world_size, context.rank, config.grad_accum)
        nll_sum = 0.0
        tokens = 0
        # DDP and FSDP average gradients over processes; scaling by world/global_tokens makes the update
        # the gradient of (sum of answer-token losses) / (answer tokens in the global batch).
        scale = context.world_size / max(1, global_tokens)
        for index, part in enumerate(parts):
            batch = {k: v.to(self.device) for k, v in collate([self.items[i] for i in part], self.pad_id).items()}
            with self._gradient_sync(last=index == len(parts) - 1):
                stats = answer_token_stats(self.train_model, batch)
                (stats.nll * scale).backward()
            nll_sum += float(stats.nll.detach())
            tokens += int(batch["attention_mask"].sum())
        nll_sum, tokens, stop = context.sum([nll_sum, tokens, float(stop_requested)], self.device)
        loss = nll_sum / max(1, global_tokens)
        # Under FSDP the gradients are DTensor shards, and the norm is taken over all of them.
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, MAX_GRAD_NORM)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        # Every process has the same loss and norm here, so all of them stop together.
        for what, value in (("training loss", loss), ("gradient norm", norm)):
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                raise _NonFinite(what, value)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, int(tokens), stop > 0


def default_eval_every(steps: int) -> int:
    """Held-out scoring interval: about four measurements between "before" and "after" (0: none, under 5 steps)."""
    return steps // 5


def _legacy_segments(state: dict) -> list[dict]:
    """The run segments of a checkpoint saved before they were recorded: one part, threads unknown."""
    if not state["step"]:
        return []
    return [
        {
            "start_step": 0,
            "steps": state["step"],
            "tokens": state["train_tokens"],
            "seconds": state["train_seconds"],
            "threads": None,
            "processes": None,
            "wall_seconds": None,
        }
    ]


def run_finetune(
    config: FinetuneConfig,
    out: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    log: Log = _stderr,
    *,
    progress: bool = True,
    eval_every: int | None = None,
) -> FinetuneOutcome:
    """Fine-tune ``config.model`` on ``config.data`` and write the adapter, metrics.json and loss.png to ``out``.

    The run trains in a staging folder next to ``out`` (``.NAME.partial``, created with its first
    checkpoint) and replaces ``out`` with it in one folder swap once everything is written, so
    ``out`` always holds complete results, the old ones until the new ones are done. Bad input
    raises a UserError before anything is written. A second run on the same ``out`` is refused
    while this one holds its lock. Ctrl-C (or SIGTERM) stops at the next step boundary with a
    checkpoint that ``resume=True`` continues; a loss that turns NaN or infinite raises
    TrainingDiverged and keeps the last checkpoint. Under torchrun every process calls this; only
    rank 0 takes the lock, writes files and logs.

    ``progress`` False hides the training bar (it shows only on a terminal anyway). ``eval_every``
    scores the held-out set every that many steps as well (0: only before and after; None:
    ``default_eval_every(config.steps)``, or the interval a resumed run was saved with).
    """
    if eval_every is not None and eval_every < 0:
        raise UserError(f"--eval-every must be 0 (off) or a positive number of steps, got {eval_every}")
    wall_start = time.perf_counter()
    out = output_folder(out)
    if resume and overwrite:
        raise UserError("--resume continues the run saved in --out and --overwrite replaces it; pass only one")
    if resume:
        source = find_resumable(out)
        if source is None:
            raise _nothing_to_resume(out)
        saved = load_run_config(source)
        changed = saved.differences(config)
        if changed:
            flags = ", ".join("--" + name.replace("_", "-") for name in changed)
            raise UserError(
                f"--resume continues the run in {source} with its saved settings, but {flags} differ from them; "
                "leave those flags out, or start a new run with a different --out"
            )
        config = FinetuneConfig.from_dict({**saved.to_dict(), "device": config.device, "threads": config.threads})
    config.validate()
    if config.fsdp:
        check_sharding_possible(context_from_env())
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder path")
    check_model_spec(config.model)
    dataset = load_dataset(config.data)
    split = training_split(dataset, load_eval_dataset(config.eval_data) if config.eval_data else None)

    device = default_device(config.device)
    context = init_distributed(device)
    log = log if context.is_main else (lambda _: None)
    lock = FolderLock(out, "another eetq-lora run", "wait for it to finish, or pass a different --out")
    saved_at = _Saved(staging_path(out))

    def claim() -> Path | None:
        lock.acquire()
        tidy_output(out, log)
        return check_output(out, resume, overwrite)

    try:
        source = _on_main(context, claim)
        if source is not None and source == saved_at.staging:
            saved_at.step = read_state(source)["step"]
        options = _RunOptions(progress, eval_every)
        return _run(
            config, out, source, resume, split, dataset.source, device, context, wall_start, log, saved_at, options
        )
    except KeyboardInterrupt:
        if saved_at.step is None:
            raise
        raise RunAborted(checkpoint_path(saved_at.staging), saved_at.step) from None
    finally:
        lock.release()
        shutdown_distributed()


def _divergence_message(error: _NonFinite, step: int, config: FinetuneConfig, out: Path, saved_at: _Saved) -> str:
    if saved_at.step is not None:
        kept = f"the last checkpoint (step {saved_at.step}) is kept in {checkpoint_path(saved_at.staging)}"
    else:
        kept = "this run saved nothing"
    if out.is_dir():
        kept += f" and {out} is as it was"
    return (
        f"training diverged at step {step}/{config.steps}: {error}, so no adapter was saved; {kept}. "
        f"Start again with a lower --lr (it is {config.lr:g}) or --alpha ({config.alpha:g}) and --overwrite"
    )


def _shard(peft_model, context: DistContext, device: torch.device, log: Log) -> list[int]:
    """Shard the model with FSDP2 and report each process's share of the int8 base; returns those shares."""
    from ..parallel import local_int8_bytes, shard_model

    total = local_int8_bytes(peft_model)
    shard_model(peft_model)
    mine = [0] * context.world_size
    mine[context.rank] = local_int8_bytes(peft_model)
    shares = [int(size) for size in context.sum(mine, device)]
    log(
        f"Sharded with FSDP2 over {context.world_size} processes: int8 base {_mib(total)} in all, per process "
        + ", ".join(f"{_mib(size)} (rank {rank})" for rank, size in enumerate(shares))
    )
    return shares


@dataclass
class _RunOptions:
    progress: bool
    eval_every: int | None


def _run(
    config,
    out,
    resume_from,
    resume,
    split,
    data_name,
    device,
    context,
    wall_start,
    log,
    saved_at: _Saved,
    options: _RunOptions,
) -> FinetuneOutcome:
    from peft import LoraConfig

    from .. import get_peft_model, load_adapter

    threads = configure_threads(config.threads, context)
    if context.is_main and device.type == "cpu" and config.threads is None:
        warn_if_busy(log)
    dtype = resolve_dtype(config.dtype, device)
    torch.manual_seed(config.seed)
    # Rank 0 converts and caches the model first; the others then find it in the cache.
    if context.is_main:
        source = resolve_model(config.model)
    context.barrier()
    if not context.is_main:
        source = resolve_model(config.model, quiet=True)

    log(
        f"Loading {source.name} and quantizing it to EETQ int8 ({str(dtype).replace('torch.', '')}, {device}, "
        f"{threads} thread(s) x {context.world_size} process(es))..."
    )
    loaded = load_quantized(source, dtype, device)
    fmt = PromptFormat(loaded.tokenizer)
    train_set = _encode(fmt, split.train, config, "training", data_name)
    held_out_name = split.held_out_source or data_name
    eval_set = _encode(fmt, split.held_out[: config.eval_examples], config, "held-out", held_out_name)
    if split.overlap:
        log(f"Left out {split.overlap} training example(s) whose prompt is in the held-out set {held_out_name}")
    pad_id = loaded.tokenizer.pad_token_id
    # Made before any scoring, so that a batch larger than the data is refused at once.
    schedule = BatchSchedule(
        [len(item.input_ids) for item in train_set.items],
        config.batch_size * config.grad_accum * context.world_size,
        config.seed,
    )

    state = read_state(resume_from) if resume_from is not None else None
    if state is None:
        lora = LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=target_module_list(config.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            peft_model = get_peft_model(loaded.model, lora)
        except ValueError as error:
            names = sorted({name.rsplit(".", 1)[-1] for name, m in loaded.model.named_modules() if _is_linear(m)})
            raise UserError(
                f"--target-modules {config.target_modules!r}: {error} This model's linear layers are named: "
                f"{', '.join(names)} (or pass all-linear)"
            ) from error
    else:
        peft_model = load_adapter(loaded.model, checkpoint_path(resume_from), is_trainable=True)
    peft_model.to(device)
    # Same results, less activation memory: RMSNorm and the MLP activation are redone in backward.
    recompute_cheap_ops(peft_model)
    int8_per_process = _shard(peft_model, context, device, log) if config.fsdp else None
    # After sharding: FSDP replaces the parameters by their shards, which the optimizer must hold.
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    if state is not None and config.fsdp:
        restore_sharded_state(resume_from, peft_model, optimizer)
    elif state is not None:
        restore_optimizer_and_rng(resume_from, optimizer, device)
    score = evaluate_sharded if config.fsdp else evaluate

    trainable_count = sum(p.numel() for p in trainable)
    total_count = sum(p.numel() for p in peft_model.parameters())
    run_record = {
        "format": 1,
        "settings": config.to_dict(),
        "model": {"name": source.name, "spec": source.spec, "folder": str(source.folder)},
        "data": {"source": data_name},
    }
    if state is None:
        log(f"Scoring {len(eval_set)} held-out examples before training...")
        before = score(peft_model, eval_set.items, config.batch_size, pad_id, device, context)
        log(f"  held-out loss {before.loss:.4f}, answer-token accuracy {before.accuracy:.1%}")
        state = {
            "step": 0,
            "train_losses": [],
            "train_tokens": 0,
            "train_seconds": 0.0,
            "held_out_before": before.to_dict(),
            "held_out_curve": [{"step": 0, **before.to_dict()}],
        }
    else:
        before = EvalResult(**{k: v for k, v in state["held_out_before"].items() if k != "perplexity"})
        log(f"Resuming at step {state['step']}/{config.steps} from {checkpoint_path(resume_from)}")
        state.setdefault("held_out_curve", [{"step": 0, **state["held_out_before"]}])
    if "segments" not in state:
        state["segments"] = _legacy_segments(state)
    if options.eval_every is not None:
        state["eval_every"] = options.eval_every
    elif "eval_every" not in state:
        state["eval_every"] = default_eval_every(config.steps)
    eval_every = state["eval_every"]
    # This process's part of the run: a resumed run reports its own speed apart from the earlier parts'.
    segment = {
        "start_step": state["step"],
        "steps": 0,
        "tokens": 0,
        "seconds": 0.0,
        "threads": threads,
        "processes": context.world_size,
        "wall_seconds": 0.0,
    }
    if state["step"] < config.steps:  # resuming a finished run trains nothing: no new part
        state["segments"].append(segment)

    train_model = peft_model
    if context.enabled and not config.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(peft_model, device_ids=[device.index] if device.type == "cuda" else None)
    trainer = _Trainer(peft_model, train_model, optimizer, train_set, schedule, config, context, device, pad_id)
    staging = saved_at.staging

    def checkpoint() -> None:
        # The run's first checkpoint creates the staging folder, with run_config.json beside it.
        record = run_record if resume_from != staging and saved_at.step is None else None
        segment["wall_seconds"] = time.perf_counter() - wall_start
        if config.fsdp:
            save_sharded_checkpoint(staging, peft_model, optimizer, state, record)
        else:
            if context.is_main:
                save_checkpoint(staging, peft_model, optimizer, state, record)
            context.barrier()
        saved_at.step = state["step"]

    step = state["step"]
    if step < config.steps:
        log(
            f"Training LoRA r={config.r} on {config.target_modules}: {trainable_count:,} trainable parameters, "
            f"{len(train_set)} training examples, {config.steps} steps of {trainer.schedule.global_batch} examples"
        )

    def measure(at: int) -> None:
        # Every process scores: the sums (and, sharded, the weights) are gathered with collectives.
        result = score(peft_model, eval_set.items, config.batch_size, pad_id, device, context)
        state["held_out_curve"].append({"step": at, **result.to_dict()})
        progress.note(f"  step {at}: held-out loss {result.loss:.4f}, accuracy {result.accuracy:.1%}", log)

    peft_model.train()
    stopped = False
    with StopRequest() as stop:
        # Made inside StopRequest, so a bar on screen means Ctrl-C now stops at a step boundary.
        progress = TrainingProgress(config.steps, start=step, enabled=options.progress and context.is_main)
        while step < config.steps:
            started = time.perf_counter()
            try:
                loss, tokens, stopped = trainer.step(step, stop.requested)
            except _NonFinite as error:
                progress.close()
                raise TrainingDiverged(_divergence_message(error, step + 1, config, out, saved_at)) from None
            step += 1
            state["step"] = step
            state["train_losses"].append(loss)
            state["train_tokens"] += tokens
            seconds = time.perf_counter() - started
            state["train_seconds"] += seconds
            segment["steps"] += 1
            segment["tokens"] += tokens
            segment["seconds"] += seconds
            progress.update(step, loss, tokens)
            if stopped:
                break
            if eval_every and step % eval_every == 0 and step < config.steps:
                measure(step)
            if step % CHECKPOINT_EVERY == 0 and step < config.steps:
                checkpoint()
    progress.close()
    peft_model.eval()
    checkpoint()
    if stopped and step < config.steps:
        return FinetuneOutcome(
            "interrupted", step, config.steps, out, is_main=context.is_main, checkpoint=checkpoint_path(staging)
        )

    if config.fsdp:
        from ..parallel.checkpoint import save_sharded_adapter

        save_sharded_adapter(peft_model, staging)
    elif context.is_main:
        save_adapter(peft_model, staging)
    log(f"Scoring {len(eval_set)} held-out examples after training...")
    after = score(peft_model, eval_set.items, config.batch_size, pad_id, device, context)
    state["held_out_curve"].append({"step": step, **after.to_dict()})
    segment["wall_seconds"] = time.perf_counter() - wall_start
    walls = [part["wall_seconds"] for part in state["segments"]]

    metrics = {
        "status": "finished",
        "model": {
            **run_record["model"],
            "parameters": loaded.parameters,
            "dtype": str(dtype).replace("torch.", ""),
            "float32_bytes": loaded.float32_bytes,
            "int8_base_bytes": loaded.quantized_bytes,
        },
        "data": {
            "source": data_name,
            "train_examples": len(train_set),
            "held_out_source": held_out_name,
            "left_out_for_held_out": split.overlap,
            "held_out_examples": len(split.held_out),
            "evaluated_examples": len(eval_set),
            "dropped_too_long": train_set.dropped + eval_set.dropped,
            "truncated": train_set.truncated + eval_set.truncated,
            "chat_template": fmt.uses_chat_template,
            "example_prompt": split.held_out[0].prompt or split.held_out[0].response,
        },
        "settings": config.to_dict(),
        "lora": {"trainable_parameters": trainable_count, "total_parameters": total_count},
        "held_out": {
            "before": before.to_dict(),
            "after": after.to_dict(),
            "eval_every": eval_every,
            "curve": state["held_out_curve"],
        },
        "training": {
            "steps": step,
            "global_batch": trainer.schedule.global_batch,
            "losses": state["train_losses"],
            "tokens": state["train_tokens"],
            "seconds": state["train_seconds"],
            "tokens_per_second": state["train_tokens"] / max(state["train_seconds"], 1e-9),
            "segments": state["segments"],
        },
        "runtime": {
            "device": str(device),
            "processes": context.world_size,
            "parallel": ("fsdp" if config.fsdp else "ddp") if context.enabled else None,
            "int8_base_bytes_per_process": int8_per_process,
            "threads": threads,
            "wall_seconds": segment["wall_seconds"],
            "total_wall_seconds": None if None in walls else sum(walls),
            "peak_memory_bytes": peak_memory_bytes(),
            "resumed": resume,
        },
        "versions": _versions(),
    }
    if context.is_main:
        if plotting_available():
            points = [(point["step"], point["loss"]) for point in state["held_out_curve"]]
            save_loss_plot(staging / LOSS_PLOT, state["train_losses"], points, f"{source.name}: EETQ int8 + LoRA")
            metrics["loss_plot"] = LOSS_PLOT
        else:
            log(f"matplotlib is not installed, so {LOSS_PLOT} was not drawn: pip install matplotlib")
        write_json_atomic(staging / METRICS, metrics)
        publish_results(staging, out)
    return FinetuneOutcome("finished", step, config.steps, out, metrics, is_main=context.is_main)
