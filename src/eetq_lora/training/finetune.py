"""The fine-tuning recipe: set up the quantized model, the data and LoRA, train, write the outputs.

``run_finetune`` checks the request and claims the output folder; ``FinetuneRecipe`` then runs the
job in the order its methods are named. Where the files go is ``run_folder``'s business, what a
checkpoint holds ``checkpoint``'s, and one optimizer step ``trainer``'s.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import FolderLock, format_size, write_json_atomic
from ..data.encode import EncodedSet, PromptFormat, encode_examples
from ..data.sources import load_dataset, load_eval_dataset
from ..data.split import Split, training_split
from ..errors import DataError, UserError
from ..lora.peft_glue import get_peft_model, load_adapter
from ..models.load import (
    LoadedModel,
    ModelSource,
    check_model_spec,
    default_device,
    load_quantized,
    resolve_dtype,
    resolve_model,
)
from ..parallel.checkpoint import save_sharded_adapter
from ..parallel.fsdp import local_int8_bytes, shard_model
from ..quant.linear import EetqLinear
from .checkpoint import restore_optimizer_and_rng, restore_sharded_state, save_checkpoint, save_sharded_checkpoint
from .config import FinetuneConfig, target_module_list
from .distributed import DistContext, check_sharding_possible, context_from_env, init_distributed, shutdown_distributed
from .evaluate import EvalResult, evaluate
from .interrupt import StopRequest
from .plot import plotting_available, save_loss_plot
from .progress import TrainingProgress
from .recompute import recompute_cheap_ops
from .run_folder import (
    LOSS_PLOT,
    METRICS,
    check_not_a_file,
    check_output,
    checkpoint_path,
    load_run_config,
    output_folder,
    publish_results,
    read_state,
    resume_source,
    save_adapter,
    staging_path,
    tidy_output,
)
from .runtime import configure_threads, on_main, peak_memory_bytes, versions, warn_if_busy
from .schedule import BatchSchedule
from .trainer import NonFinite, TrainData, Trainer

CHECKPOINT_EVERY = 50

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


@dataclass
class _Saved:
    """The step of the last checkpoint in the run's staging folder (None: this run has saved nothing)."""

    staging: Path
    step: int | None = None


@dataclass
class _Job:
    """What ``run_finetune`` settled before the recipe starts: settings, folders, data and processes."""

    config: FinetuneConfig
    out: Path
    split: Split
    data_name: str
    device: torch.device
    context: DistContext
    log: Log
    saved: _Saved
    resume_from: Path | None
    resumed: bool
    progress: bool
    eval_every: int | None
    wall_start: float


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _encode(fmt: PromptFormat, examples, config: FinetuneConfig, what: str, source: str) -> EncodedSet:
    encoded = encode_examples(fmt, examples, config.max_seq_len)
    if not encoded.items:
        raise DataError(
            f"none of the {len(examples)} {what} example(s) of {source} fits in --max-seq-len {config.max_seq_len} "
            "tokens with room for an answer; raise --max-seq-len"
        )
    return encoded


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


class FinetuneRecipe:
    """One fine-tuning run: ``run`` calls ``setup_model``, ``setup_data``, ``setup_adapter``, ``setup_state``
    and ``train``, then ``write_outputs``, or stops with a checkpoint when Ctrl-C asked it to."""

    # Set by the setup methods, in the order they run.
    threads: int
    dtype: torch.dtype
    source: ModelSource
    loaded: LoadedModel
    run_record: dict
    fmt: PromptFormat
    train_set: EncodedSet
    eval_set: EncodedSet
    held_out_name: str
    data: TrainData
    peft_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    int8_per_process: list[int] | None
    trainable_count: int
    total_count: int
    state: dict | None
    before: EvalResult
    segment: dict
    trainer: Trainer
    progress: TrainingProgress

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.config = job.config
        self.log = job.log

    def run(self) -> FinetuneOutcome:
        """Run the job to its end (or to Ctrl-C) and say how it ended."""
        self.setup_model()
        self.setup_data()
        self.setup_adapter()
        self.setup_state()
        stopped = self.train()
        self.checkpoint()
        job, step = self.job, self.state["step"]
        if stopped and step < self.config.steps:
            checkpoint = checkpoint_path(job.saved.staging)
            return FinetuneOutcome(
                "interrupted", step, self.config.steps, job.out, is_main=job.context.is_main, checkpoint=checkpoint
            )
        return self.write_outputs()

    # --- setup -----------------------------------------------------------------------------------

    def setup_model(self) -> None:
        """Load the base model and quantize it to EETQ int8, with this process's threads and dtype."""
        job, config, context = self.job, self.config, self.job.context
        self.threads = configure_threads(config.threads, context)
        if context.is_main and job.device.type == "cpu" and config.threads is None:
            warn_if_busy(self.log)
        self.dtype = resolve_dtype(config.dtype, job.device)
        torch.manual_seed(config.seed)
        # Rank 0 converts and caches the model first; the others then find it in the cache.
        if context.is_main:
            self.source = resolve_model(config.model)
        context.barrier()
        if not context.is_main:
            self.source = resolve_model(config.model, quiet=True)
        self.log(
            f"Loading {self.source.name} and quantizing it to EETQ int8 ({str(self.dtype).replace('torch.', '')}, "
            f"{job.device}, {self.threads} thread(s) x {context.world_size} process(es))..."
        )
        self.loaded = load_quantized(self.source, self.dtype, job.device)
        self.run_record = {
            "format": 1,
            "settings": config.to_dict(),
            "model": {"name": self.source.name, "spec": self.source.spec, "folder": str(self.source.folder)},
            "data": {"source": job.data_name},
        }

    def setup_data(self) -> None:
        """Encode the training and held-out examples with the model's tokenizer; fix the order of the batches."""
        job, config, split = self.job, self.config, self.job.split
        self.fmt = PromptFormat(self.loaded.tokenizer)
        self.train_set = _encode(self.fmt, split.train, config, "training", job.data_name)
        self.held_out_name = split.held_out_source or job.data_name
        held_out = split.held_out[: config.eval_examples]
        self.eval_set = _encode(self.fmt, held_out, config, "held-out", self.held_out_name)
        if split.overlap:
            self.log(
                f"Left out {split.overlap} training example(s) whose prompt is in the held-out set {self.held_out_name}"
            )
        # Made before any scoring, so that a batch larger than the data is refused at once.
        schedule = BatchSchedule(
            [len(item.input_ids) for item in self.train_set.items],
            config.batch_size * config.grad_accum * job.context.world_size,
            config.seed,
        )
        self.data = TrainData(self.train_set.items, schedule, self.loaded.tokenizer.pad_token_id)

    def setup_adapter(self) -> None:
        """Attach LoRA (new, or the checkpoint's when resuming), shard it under --fsdp, make its optimizer."""
        job, config = self.job, self.config
        self.state = read_state(job.resume_from) if job.resume_from is not None else None
        if self.state is None:
            model = self._new_adapter()
        else:
            model = load_adapter(self.loaded.model, checkpoint_path(job.resume_from), is_trainable=True)
        model.to(job.device)
        # Same results, less activation memory: RMSNorm and the MLP activation are redone in backward.
        recompute_cheap_ops(model)
        self.int8_per_process = self._shard(model) if config.fsdp else None
        # After sharding: FSDP replaces the parameters by their shards, which the optimizer must hold.
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
        if self.state is not None and config.fsdp:
            restore_sharded_state(job.resume_from, model, self.optimizer)
        elif self.state is not None:
            restore_optimizer_and_rng(job.resume_from, self.optimizer, job.device)
        self.peft_model = model
        self.trainable_count = sum(p.numel() for p in trainable)
        self.total_count = sum(p.numel() for p in model.parameters())

    def _new_adapter(self):
        """A fresh LoRA adapter on the quantized model, or a UserError naming the layers --target-modules can pick."""
        from peft import LoraConfig

        config, model = self.config, self.loaded.model
        lora = LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=target_module_list(config.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            return get_peft_model(model, lora)
        except ValueError as error:
            linear = (torch.nn.Linear, EetqLinear)
            names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, linear)})
            raise UserError(
                f"--target-modules {config.target_modules!r}: {error} This model's linear layers are named: "
                f"{', '.join(names)} (or pass all-linear)"
            ) from error

    def _shard(self, model) -> list[int]:
        """Shard the model with FSDP2 and report each process's share of the int8 base; returns those shares."""
        context, device = self.job.context, self.job.device
        total = local_int8_bytes(model)
        shard_model(model)
        mine = [0] * context.world_size
        mine[context.rank] = local_int8_bytes(model)
        shares = [int(size) for size in context.sum(mine, device)]
        self.log(
            f"Sharded with FSDP2 over {context.world_size} processes: int8 base {format_size(total)} in all, "
            + "per process "
            + ", ".join(f"{format_size(size)} (rank {rank})" for rank, size in enumerate(shares))
        )
        return shares

    def setup_state(self) -> None:
        """The run's progress record: a new one (after scoring the held-out set once), or the checkpoint's."""
        config, state = self.config, self.state
        if state is None:
            self.log(f"Scoring {len(self.eval_set)} held-out examples before training...")
            self.before = self._score()
            self.log(f"  held-out loss {self.before.loss:.4f}, answer-token accuracy {self.before.accuracy:.1%}")
            state = self.state = {
                "step": 0,
                "train_losses": [],
                "train_tokens": 0,
                "train_seconds": 0.0,
                "held_out_before": self.before.to_dict(),
                "held_out_curve": [{"step": 0, **self.before.to_dict()}],
            }
        else:
            self.before = EvalResult(**{k: v for k, v in state["held_out_before"].items() if k != "perplexity"})
            self.log(f"Resuming at step {state['step']}/{config.steps} from {checkpoint_path(self.job.resume_from)}")
            state.setdefault("held_out_curve", [{"step": 0, **state["held_out_before"]}])
        if "segments" not in state:
            state["segments"] = _legacy_segments(state)
        if self.job.eval_every is not None:
            state["eval_every"] = self.job.eval_every
        elif "eval_every" not in state:
            state["eval_every"] = default_eval_every(config.steps)
        # This process's part of the run: a resumed run reports its own speed apart from the earlier parts'.
        self.segment = {
            "start_step": state["step"],
            "steps": 0,
            "tokens": 0,
            "seconds": 0.0,
            "threads": self.threads,
            "processes": self.job.context.world_size,
            "wall_seconds": 0.0,
        }
        if state["step"] < config.steps:  # resuming a finished run trains nothing: no new part
            state["segments"].append(self.segment)

    def _score(self) -> EvalResult:
        """Score the held-out set; every process takes part (the sums and, sharded, the weights are gathered)."""
        items, batch_size, job = self.eval_set.items, self.config.batch_size, self.job
        return evaluate(
            self.peft_model, items, batch_size, self.data.pad_id, job.device, job.context, lockstep=self.config.fsdp
        )

    # --- training --------------------------------------------------------------------------------

    def train(self) -> bool:
        """Train up to --steps, scoring and saving checkpoints on the way; returns whether Ctrl-C stopped it."""
        config, job = self.config, self.job
        self.trainer = Trainer(self.peft_model, self.optimizer, self.data, config, job.context, job.device)
        step = self.state["step"]
        if step < config.steps:
            self.log(
                f"Training LoRA r={config.r} on {config.target_modules}: {self.trainable_count:,} trainable "
                f"parameters, {len(self.train_set)} training examples, {config.steps} steps of "
                f"{self.trainer.global_batch} examples"
            )
        self.peft_model.train()
        stopped = False
        with StopRequest() as stop:
            # Made inside StopRequest, so a bar on screen means Ctrl-C now stops at a step boundary.
            self.progress = TrainingProgress(config.steps, start=step, enabled=job.progress and job.context.is_main)
            if self._measurement_due(step) and all(point["step"] != step for point in self.state["held_out_curve"]):
                self._measure(step)  # the run this one resumes stopped before measuring it
            while step < config.steps:
                # Asked after the step's backward pass: a Ctrl-C during the step stops after it.
                stopped = self._train_step(step, lambda: stop.requested)
                step += 1
                if stopped:
                    break
                if self._measurement_due(step):
                    self._measure(step)
                if step % CHECKPOINT_EVERY == 0 and step < config.steps:
                    self.checkpoint()
        self.progress.close()
        self.peft_model.eval()
        return stopped

    def _measurement_due(self, step: int) -> bool:
        """Whether the held-out set is scored after ``step`` steps (every ``eval_every``, not at the ends)."""
        eval_every = self.state["eval_every"]
        return bool(eval_every) and 0 < step < self.config.steps and step % eval_every == 0

    def _train_step(self, step: int, stop_requested: Callable[[], bool]) -> bool:
        """Run optimizer step ``step`` and record it; returns whether every process agreed to stop after it."""
        started = time.perf_counter()
        try:
            loss, tokens, stopped = self.trainer.step(step, stop_requested)
        except NonFinite as error:
            self.progress.close()
            message = _divergence_message(error, step + 1, self.config, self.job.out, self.job.saved)
            raise TrainingDiverged(message) from None
        state, segment = self.state, self.segment
        state["step"] = step + 1
        state["train_losses"].append(loss)
        state["train_tokens"] += tokens
        seconds = time.perf_counter() - started
        state["train_seconds"] += seconds
        segment["steps"] += 1
        segment["tokens"] += tokens
        segment["seconds"] += seconds
        self.progress.update(step + 1, loss, tokens)
        return stopped

    def _measure(self, step: int) -> None:
        """Score the held-out set in the middle of training and add the point to the curve."""
        result = self._score()
        self.state["held_out_curve"].append({"step": step, **result.to_dict()})
        self.progress.note(f"  step {step}: held-out loss {result.loss:.4f}, accuracy {result.accuracy:.1%}", self.log)

    def checkpoint(self) -> None:
        """Save the training state in the staging folder; the run's first checkpoint creates that folder,
        with run_config.json beside it."""
        job, saved = self.job, self.job.saved
        record = self.run_record if job.resume_from != saved.staging and saved.step is None else None
        self.segment["wall_seconds"] = time.perf_counter() - job.wall_start
        if self.config.fsdp:
            save_sharded_checkpoint(saved.staging, self.peft_model, self.optimizer, self.state, record)
        else:
            if job.context.is_main:
                save_checkpoint(saved.staging, self.peft_model, self.optimizer, self.state, record)
            job.context.barrier()
        saved.step = self.state["step"]

    # --- outputs ---------------------------------------------------------------------------------

    def write_outputs(self) -> FinetuneOutcome:
        """Save the adapter, score the held-out set again, write metrics.json and loss.png, then publish OUT."""
        job, config, staging = self.job, self.config, self.job.saved.staging
        if config.fsdp:
            save_sharded_adapter(self.peft_model, staging)
        elif job.context.is_main:
            save_adapter(self.peft_model, staging)
        self.log(f"Scoring {len(self.eval_set)} held-out examples after training...")
        after = self._score()
        step = self.state["step"]
        self.state["held_out_curve"].append({"step": step, **after.to_dict()})
        self.segment["wall_seconds"] = time.perf_counter() - job.wall_start
        metrics = self._metrics(after)
        if job.context.is_main:
            self._plot(metrics)
            write_json_atomic(staging / METRICS, metrics)
            publish_results(staging, job.out)
        return FinetuneOutcome("finished", step, config.steps, job.out, metrics, is_main=job.context.is_main)

    def _plot(self, metrics: dict) -> None:
        """Draw loss.png into the staging folder, or say how to get it."""
        if not plotting_available():
            self.log(f"matplotlib is not installed, so {LOSS_PLOT} was not drawn: pip install matplotlib")
            return
        points = [(point["step"], point["loss"]) for point in self.state["held_out_curve"]]
        title = f"{self.source.name}: EETQ int8 + LoRA"
        save_loss_plot(self.job.saved.staging / LOSS_PLOT, self.state["train_losses"], points, title)
        metrics["loss_plot"] = LOSS_PLOT

    def _metrics(self, after: EvalResult) -> dict:
        """What metrics.json records about the finished run."""
        loaded, state = self.loaded, self.state
        return {
            "status": "finished",
            "model": {
                **self.run_record["model"],
                "parameters": loaded.parameters,
                "dtype": str(self.dtype).replace("torch.", ""),
                "float32_bytes": loaded.float32_bytes,
                "int8_base_bytes": loaded.quantized_bytes,
            },
            "data": self._data_record(),
            "settings": self.config.to_dict(),
            "lora": {"trainable_parameters": self.trainable_count, "total_parameters": self.total_count},
            "held_out": {
                "before": self.before.to_dict(),
                "after": after.to_dict(),
                "eval_every": state["eval_every"],
                "curve": state["held_out_curve"],
            },
            "training": {
                "steps": state["step"],
                "global_batch": self.trainer.global_batch,
                "losses": state["train_losses"],
                "tokens": state["train_tokens"],
                "seconds": state["train_seconds"],
                "tokens_per_second": state["train_tokens"] / max(state["train_seconds"], 1e-9),
                "segments": state["segments"],
            },
            "runtime": self._runtime_record(),
            "versions": versions(),
        }

    def _data_record(self) -> dict:
        split, train_set, eval_set = self.job.split, self.train_set, self.eval_set
        return {
            "source": self.job.data_name,
            "train_examples": len(train_set),
            "held_out_source": self.held_out_name,
            "left_out_for_held_out": split.overlap,
            "held_out_examples": len(split.held_out),
            "evaluated_examples": len(eval_set),
            "dropped_too_long": train_set.dropped + eval_set.dropped,
            "truncated": train_set.truncated + eval_set.truncated,
            "chat_template": self.fmt.uses_chat_template,
            "example_prompt": split.held_out[0].prompt or split.held_out[0].response,
        }

    def _runtime_record(self) -> dict:
        job, config = self.job, self.config
        walls = [part["wall_seconds"] for part in self.state["segments"]]
        return {
            "device": str(job.device),
            "processes": job.context.world_size,
            "parallel": ("fsdp" if config.fsdp else "ddp") if job.context.enabled else None,
            "int8_base_bytes_per_process": self.int8_per_process,
            "threads": self.threads,
            "wall_seconds": self.segment["wall_seconds"],
            "total_wall_seconds": None if None in walls else sum(walls),
            "peak_memory_bytes": peak_memory_bytes(),
            "resumed": job.resumed,
        }


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
    config = _checked_settings(config, out, resume, overwrite)
    check_model_spec(config.model)
    try:
        dataset = load_dataset(config.data)
    except DataError:
        if resume and not Path(config.data).exists() and config.data != "builtin":
            # Resuming trains on the same data: --data pointing elsewhere would be refused as a change.
            raise DataError(
                f"the run being resumed trained on {config.data}, which is gone; put the file back there to "
                "resume, or start a new run on its new place with --overwrite"
            ) from None
        raise
    split = training_split(dataset, load_eval_dataset(config.eval_data) if config.eval_data else None)

    device = default_device(config.device)
    context = init_distributed(device)
    log = log if context.is_main else (lambda _: None)
    lock = FolderLock(out, "another eetq-lora run", "wait for it to finish, or pass a different --out")
    saved = _Saved(staging_path(out))
    try:
        resume_from = on_main(context, lambda: _claim(lock, out, resume, overwrite, log))
        if resume_from is not None and resume_from == saved.staging:
            saved.step = read_state(resume_from)["step"]
        job = _Job(
            config=config,
            out=out,
            split=split,
            data_name=dataset.source,
            device=device,
            context=context,
            log=log,
            saved=saved,
            resume_from=resume_from,
            resumed=resume,
            progress=progress,
            eval_every=eval_every,
            wall_start=wall_start,
        )
        return FinetuneRecipe(job).run()
    except KeyboardInterrupt:
        if saved.step is None:
            raise
        raise RunAborted(checkpoint_path(saved.staging), saved.step) from None
    finally:
        lock.release()
        shutdown_distributed()


def _claim(lock: FolderLock, out: Path, resume: bool, overwrite: bool, log: Log) -> Path | None:
    """Take ``out``'s lock, tidy what killed runs left there and check it may be written; returns the
    folder a resume continues."""
    lock.acquire()
    tidy_output(out, log)
    return check_output(out, resume, overwrite)


def _checked_settings(config: FinetuneConfig, out: Path, resume: bool, overwrite: bool) -> FinetuneConfig:
    """The run's settings, checked; a resumed run's are the saved ones, with this run's device and threads."""
    if resume and overwrite:
        raise UserError("--resume continues the run saved in --out and --overwrite replaces it; pass only one")
    if resume:
        source = resume_source(out)
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
    check_not_a_file(out)
    return config


def _divergence_message(error: NonFinite, step: int, config: FinetuneConfig, out: Path, saved: _Saved) -> str:
    if saved.step is not None:
        kept = f"the last checkpoint (step {saved.step}) is kept in {checkpoint_path(saved.staging)}"
    else:
        kept = "this run saved nothing"
    if out.is_dir():
        kept += f" and {out} is as it was"
    return (
        f"training diverged at step {step}/{config.steps}: {error}, so no adapter was saved; {kept}. "
        f"Start again with a lower --lr (it is {config.lr:g}) or --alpha ({config.alpha:g}) and --overwrite"
    )
