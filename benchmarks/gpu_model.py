"""A Llama-3-8B-shaped model on one CUDA GPU: LoRA training, greedy decoding and the M=1 kernel, with checks.

Run from the repository root on an H100/H200 (it stops itself before 8 minutes; docs/gpu.md gives
the offline install line for a machine without transformers 5.24/peft 0.21):
python benchmarks/gpu_model.py [--quick] [--only kernel|train|decode] [--layers N] [--budget-s S].
``--dry-run`` runs every section on the CPU with tiny shapes (the Triton kernel through Triton's
interpreter), to check the script itself.

The model is built from its config with random bfloat16 weights on the GPU (hidden 4096,
intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocabulary 128256); nothing is downloaded.
One markdown table is printed at the end (each row is also printed as it is measured):

- check: the Triton forward and input gradient on the model's layer shapes against a float32
  reference (dequantize, then matmul), and EetqLoraLinear's output and gradients (input, A, B)
  against the same LoRA math in float32. A wrong result makes the exit status 1.
- kernel: M=1 forward (the decoding case) of the Triton kernel and of the public EetqLinear,
  graph-replayed over enough distinct weights that each call reads its weight from HBM, as GB/s
  and as a fraction of a device-to-device copy measured in the same run; bfloat16 F.linear for
  comparison.
- train: one LoRA step (r=16, all-linear, AdamW, gradient checkpointing, sequence 2048, batch 1
  and 4): tokens/s and peak allocated memory for eetq_lora (quantize_model + get_peft_model) with
  transformers' loss and with eetq_lora's own training step (chunked vocabulary loss and
  recompute_cheap_ops, as ``eetq-lora finetune`` runs it), PEFT LoRA on the bfloat16 model, and
  torchao int8 weight-only and bitsandbytes 8-bit under PEFT where those import.
- decode: greedy ``generate`` tokens/s at batch 1 and 16 with one adapter, ours against the
  bfloat16 model with PEFT, eager and with transformers' compiled decoding (static cache,
  torch.compile in reduce-overhead mode, i.e. CUDA graphs).
- target: the ratios the project aims for, each with pass or miss.

A mode that fails is a row with its one-line error, not a crash. Sections are skipped, with a
row saying so, when the time budget (``--budget-s``) would be exceeded.
"""

from __future__ import annotations

import time

START = time.monotonic()

import os  # noqa: E402
import sys  # noqa: E402

if "--dry-run" in sys.argv:  # the interpreter switch is read when Triton kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

try:
    import eetq_lora
except ImportError:  # a bare checkout: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import eetq_lora

import transformers  # noqa: E402
from gpu_check import BUDGET, Clock, cold_copies, copy_gbps, relative_error  # noqa: E402
from int8_layers import SingleLayer, lora_config  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft import get_peft_model as peft_get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation import CompileConfig  # noqa: E402

from eetq_lora.kernels import dispatch, reference, select_path, triton_kernels  # noqa: E402
from eetq_lora.training.loss import answer_token_stats  # noqa: E402
from eetq_lora.training.recompute import recompute_cheap_ops  # noqa: E402

RANK, ALPHA = 16, 32
GiB = 2**30
# Targets: training speed and peak memory against PEFT on the bfloat16 model, batch-1 decoding
# speed against the same, and the M=1 kernel's read rate on the 14336-wide layers.
TRAIN_SPEED_MIN, TRAIN_MEMORY_MAX = 0.9, 0.6
DECODE_SPEED_MIN = 1.5
KERNEL_COPY_FRACTION_MIN = 0.7
TRAIN_CONFIGS = ("peft-bf16", "eetq", "eetq/library-step", "torchao-int8wo", "bnb-int8")


class BudgetSpent(BaseException):
    """The run's hard time limit passed (raised from SIGALRM; not an Exception, so no handler swallows it)."""


@dataclass
class Row:
    section: str
    case: str
    impl: str
    result: str
    versus: str = ""
    status: str = ""


@dataclass
class Report:
    """The rows of the one table, printed as they come and all together at the end."""

    rows: list[Row] = field(default_factory=list)
    wrong: int = 0

    def add(self, section: str, case: str, impl: str, result: str, versus: str = "", status: str = "") -> None:
        row = Row(section, case, impl, result, versus, status)
        self.rows.append(row)
        self.wrong += status == "WRONG"
        print(f"[{time.monotonic() - START:6.1f} s] {section} | {case} | {impl} | {result} | {versus} | {status}")
        sys.stdout.flush()

    def markdown(self) -> str:
        lines = ["| section | case | implementation | result | vs reference | status |", "| --- " * 6 + "|"]
        for row in self.rows:
            cells = (row.section, row.case, row.impl, row.result, row.versus, row.status)
            lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
        return "\n".join(lines)


class Budget:
    """Seconds left before the soft limit (sections about to overrun it are skipped) and a hard stop."""

    def __init__(self, seconds: float, report: Report) -> None:
        self.seconds = seconds
        self.report = report

    def left(self) -> float:
        return self.seconds - (time.monotonic() - START)

    def allows(self, section: str, what: str, needs: float) -> bool:
        """Whether about ``needs`` seconds are left; otherwise a 'skipped' row for ``what``."""
        if self.left() >= needs:
            return True
        self.report.add(
            section,
            what,
            "-",
            f"skipped: {max(0.0, self.left()):.0f} s of the {self.seconds:.0f} s budget left, "
            f"needs about {needs:.0f} s",
        )
        return False

    def arm(self, grace: float) -> None:
        """Raise BudgetSpent ``grace`` seconds after the soft limit, wherever the run is."""

        def stop(signum, frame):
            raise BudgetSpent()

        signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, max(1.0, self.left() + grace))


@dataclass
class Setup:
    """What every section needs: shapes and sizes for a real run or a dry run."""

    device: torch.device
    dry_run: bool
    quick: bool
    config: LlamaConfig
    seq: int
    train_batches: tuple[int, ...]
    train_steps: int
    decode_batches: tuple[int, ...]
    compile_batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    decode_repeats: int
    check_rows: tuple[int, ...]
    clock: Clock
    budget: Budget
    report: Report
    # Seconds each unit is expected to take on an H100/H200, for the budget checks.
    costs: dict[str, float]


def llama_config(dry_run: bool, layers: int) -> LlamaConfig:
    """Llama-3-8B's shape (or a tiny one with the same proportions for a dry run); no cache in training."""
    if dry_run:
        sizes = dict(
            vocab_size=1024, hidden_size=256, intermediate_size=896, num_attention_heads=4, num_key_value_heads=1
        )
    else:
        sizes = dict(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8
        )
    return LlamaConfig(
        **sizes,
        num_hidden_layers=layers,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def layer_shapes(config: LlamaConfig) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of the distinct linear layers of one decoder layer."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    return [("q, o", hidden, hidden), ("k, v", hidden, kv), ("gate, up", hidden, inter), ("down", inter, hidden)]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:240]


def triton_failures() -> list[str]:
    """Errors after which dispatch silently fell back to the reference path (then timings are not the kernel's)."""
    return list(dispatch._triton_failed)


def build_float(config: LlamaConfig, device: torch.device) -> LlamaForCausalLM:
    """The bfloat16 model with random weights, created directly on ``device`` (seeded: every build is the same)."""
    torch.manual_seed(0)
    with torch.device(device):
        # A copy: the model keeps its config object, and training sets use_cache=False on it.
        model = LlamaForCausalLM._from_config(copy.deepcopy(config), dtype=torch.bfloat16)
    return model.to(device)


def device_weight(in_features: int, out_features: int, device: torch.device, seed: int):
    """A random EETQ weight (int8 [in, out], float16 scales [out]) made on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    qweight = torch.randint(
        -128, 128, (in_features, out_features), dtype=torch.int8, device=device, generator=generator
    )
    scales = (torch.rand(out_features, device=device, generator=generator) / 64 + 1e-4).half()
    return qweight, scales


def eetq_layer(qweight: torch.Tensor, scales: torch.Tensor) -> eetq_lora.EetqLinear:
    in_features, out_features = qweight.shape
    layer = eetq_lora.EetqLinear(in_features, out_features, bias=False, device=qweight.device)
    layer.weight.data = qweight
    layer.weight_scales = scales
    return layer


# ---------------------------------------------------------------------------------------------- checks


def check_section(setup: Setup) -> None:
    """The Triton kernel and EetqLoraLinear on the model's layer shapes against float32 math."""
    device, report = setup.device, setup.report
    dtype = torch.bfloat16
    budget = BUDGET[dtype]
    for name, in_features, out_features in layer_shapes(setup.config):
        shape = f"{in_features}x{out_features} ({name})"
        qweight, scales = device_weight(in_features, out_features, device, seed=7)
        for rows in setup.check_rows:
            x = torch.randn(rows, in_features, device=device, dtype=dtype)
            grad = torch.randn(rows, out_features, device=device, dtype=dtype)
            err_y = relative_error(
                triton_kernels.forward(x, qweight, scales), reference.forward(x, qweight, scales, torch.float32)
            )
            err_dx = relative_error(
                triton_kernels.grad_input(grad, qweight, scales),
                reference.grad_input(grad, qweight, scales, torch.float32),
            )
            ok = err_y < budget and err_dx < budget
            report.add(
                "check",
                f"{shape} M={rows}",
                "triton forward, grad_input",
                f"rel err {err_y:.1e}, {err_dx:.1e}",
                f"float32 reference; budget {budget:.0e}",
                "ok" if ok else "WRONG",
            )
        for rows in setup.check_rows:
            check_lora_layer(setup, shape, in_features, out_features, rows)
        del qweight, scales
        free_memory()


def check_lora_layer(setup: Setup, shape: str, in_features: int, out_features: int, rows: int) -> None:
    """EetqLoraLinear forward and backward against ``x Wd^T + (x A^T B^T) * scaling`` in float32."""
    device, dtype = setup.device, torch.bfloat16
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
    nn.init.normal_(linear.weight, std=in_features**-0.5)
    model = eetq_lora.get_peft_model(SingleLayer(eetq_lora.EetqLinear.from_linear(linear)), lora_config())
    del linear
    layer = model.base_model.model.proj
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_b.normal_(std=0.02)  # PEFT starts B at zero, which would hide the adapter's share
    scaling = layer.scaling["default"]
    x = torch.randn(rows, in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(rows, out_features, device=device, dtype=dtype)
    out = model(x)
    out.backward(grad)

    weight = layer.base_layer.dequantize(torch.float32)
    x32 = x.detach().float().requires_grad_(True)
    a32 = lora_a.detach().float().clone().requires_grad_(True)
    b32 = lora_b.detach().float().clone().requires_grad_(True)
    expected = x32 @ weight.t() + (x32 @ a32.t() @ b32.t()) * scaling
    expected.backward(grad.float())
    errors = {
        "y": relative_error(out, expected),
        "dx": relative_error(x.grad, x32.grad),
        "dA": relative_error(lora_a.grad, a32.grad),
        "dB": relative_error(lora_b.grad, b32.grad),
    }
    # y and dx come out in bfloat16; the adapter's gradients are float32 sums of exact products.
    budgets = {"y": BUDGET[dtype], "dx": BUDGET[dtype], "dA": BUDGET[torch.float32], "dB": BUDGET[torch.float32]}
    ok = all(errors[key] < budgets[key] for key in errors)
    path = select_path(device.type, dtype, rows, layer.base_layer.weight)
    setup.report.add(
        "check",
        f"{shape} M={rows}",
        f"EetqLoraLinear fwd+bwd ({path})",
        " ".join(f"{key} {value:.1e}" for key, value in errors.items()),
        f"float32 LoRA; budgets {BUDGET[dtype]:.0e}, {BUDGET[torch.float32]:.0e} (dA, dB)",
        "ok" if ok else "WRONG",
    )


# ---------------------------------------------------------------------------------------------- kernel


def kernel_section(setup: Setup, bandwidth: float) -> dict[str, float]:
    """M=1 forward read rates; returns the Triton kernel's fraction of copy bandwidth by shape name."""
    device, report, clock = setup.device, setup.report, setup.clock
    fractions = {}
    for name, in_features, out_features in layer_shapes(setup.config):
        shape = f"{in_features}x{out_features} ({name})"
        int8_bytes = in_features * out_features + 2 * out_features
        copies = cold_copies(int8_bytes, device)
        weights = [device_weight(in_features, out_features, device, seed) for seed in range(copies)]
        layers = [eetq_layer(q, s) for q, s in weights]
        x = torch.randn(1, in_features, device=device, dtype=torch.bfloat16)
        grad = torch.randn(1, out_features, device=device, dtype=torch.bfloat16)
        timings = {
            "triton forward": clock.graph_ms(
                [lambda q=q, s=s, x=x: triton_kernels.forward(x, q, s) for q, s in weights]
            ),
            "triton grad_input": clock.graph_ms(
                [lambda q=q, s=s, g=grad: triton_kernels.grad_input(g, q, s) for q, s in weights]
            ),
            "EetqLinear forward": clock.graph_ms([lambda layer=layer, x=x: layer(x) for layer in layers]),
        }
        path = select_path(device.type, torch.bfloat16, 1, weights[0][0])
        for impl, ms in timings.items():
            gbps = int8_bytes / (ms / 1e3) / 1e9
            fraction = gbps / bandwidth
            if impl == "triton forward":
                fractions[name] = fraction
            label = impl if impl != "EetqLinear forward" else f"{impl} ({path})"
            report.add(
                "kernel", f"{shape} M=1", label, f"{ms * 1e3:.1f} us, {gbps:.0f} GB/s", f"{fraction:.0%} of copy"
            )
        del weights, layers
        dense_bytes = 2 * in_features * out_features
        dense = [
            torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16)
            for _ in range(cold_copies(dense_bytes, device))
        ]
        ms = clock.graph_ms([lambda w=w, x=x: F.linear(x, w) for w in dense])
        gbps = dense_bytes / (ms / 1e3) / 1e9
        report.add(
            "kernel",
            f"{shape} M=1",
            "bf16 F.linear (peer)",
            f"{ms * 1e3:.1f} us, {gbps:.0f} GB/s",
            f"{gbps / bandwidth:.0%} of copy",
        )
        del dense
        free_memory()
    report.add(
        "kernel",
        f"{setup.config.hidden_size}x{setup.config.vocab_size} (lm_head)",
        "-",
        "not timed: quantize_model keeps lm_head in bfloat16",
    )
    return fractions


# ---------------------------------------------------------------------------------------------- train


def to_bitsandbytes(model: nn.Module, device: torch.device) -> None:
    """Replace every nn.Linear but the head by bitsandbytes' Linear8bitLt (LLM.int8(), threshold 6), in place."""
    import bitsandbytes as bnb

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    for name in names:
        linear = model.get_submodule(name)
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=False, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
        # Int8Params quantizes when it moves to a device; the weight is already there, so quantize in place.
        layer.weight = weight._quantize(device)
        model.set_submodule(name, layer)
        del linear
    model.is_loaded_in_8bit = True  # PEFT then wraps the layers in its bitsandbytes LoRA layer


def build_train_model(name: str, setup: Setup) -> tuple[nn.Module, bool]:
    """The LoRA model of one training configuration, and whether it uses eetq_lora's training step."""
    model = build_float(setup.config, setup.device)
    model.config.use_cache = False
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0)
    if name.startswith("eetq"):
        eetq_lora.quantize_model(model)
    elif name == "torchao-int8wo":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(
            model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn
        )
    elif name == "bnb-int8":
        to_bitsandbytes(model, setup.device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = (eetq_lora.get_peft_model if name.startswith("eetq") else peft_get_peft_model)(model, lora)
    library_step = name == "eetq/library-step"
    if library_step:
        recompute_cheap_ops(peft_model)
    peft_model.train()
    return peft_model, library_step


@dataclass
class TrainResult:
    tokens_per_s: float
    peak_bytes: float
    model_bytes: float
    first_loss: float


def train_cell(model: nn.Module, library_step: bool, batch: int, setup: Setup) -> TrainResult:
    device = setup.device
    generator = torch.Generator(device=device).manual_seed(batch)
    tokens = torch.randint(0, setup.config.vocab_size, (batch, setup.seq), device=device, generator=generator)
    labelled = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> float:
        if library_step:
            stats = answer_token_stats(model, labelled)
            loss = stats.nll / stats.tokens
        else:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    free_memory()
    model_bytes = torch.cuda.memory_allocated() if device.type == "cuda" else math.nan
    first_loss = step()  # warm-up: kernel compilation, optimizer state, allocator growth
    durations = []
    for _ in range(setup.train_steps):
        begin = time.perf_counter()
        step()  # loss.item() synchronizes
        durations.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else math.nan
    return TrainResult(batch * setup.seq / statistics.median(durations), peak, model_bytes, first_loss)


def memory_text(result: TrainResult) -> str:
    if math.isnan(result.peak_bytes):
        return "no CUDA memory stats on the CPU"
    return f"peak {result.peak_bytes / GiB:.2f} GiB (model {result.model_bytes / GiB:.2f} GiB)"


def train_section(setup: Setup) -> dict[tuple[str, int], TrainResult]:
    report, results = setup.report, {}
    for name in TRAIN_CONFIGS:
        needs = setup.costs["train build"] + sum(setup.costs[f"train b{b}"] for b in setup.train_batches)
        if name == "bnb-int8":
            needs *= 2
        if not setup.budget.allows("train", name, needs):
            continue
        try:
            model, library_step = build_train_model(name, setup)
        except ImportError as error:
            report.add("train", f"seq {setup.seq}", name, f"not installed ({one_line(error)})")
            continue
        except Exception as error:  # noqa: BLE001 - a peer that does not build is reported, not fatal
            report.add("train", f"seq {setup.seq}", name, f"failed to build: {one_line(error)}")
            free_memory()
            continue
        for batch in setup.train_batches:
            case = f"b={batch} seq={setup.seq}"
            try:
                result = train_cell(model, library_step, batch, setup)
            except Exception as error:  # noqa: BLE001
                report.add("train", case, name, f"failed: {one_line(error)}")
                free_memory()
                continue
            results[(name, batch)] = result
            peer = results.get(("peft-bf16", batch))
            versus = ""
            status = ""
            if peer is not None and name != "peft-bf16":
                speed, memory = result.tokens_per_s / peer.tokens_per_s, result.peak_bytes / peer.peak_bytes
                versus = f"{speed:.2f}x tok/s" + ("" if math.isnan(memory) else f", {memory:.2f}x peak")
            if not math.isfinite(result.first_loss):
                status = "WRONG"
            elif name.startswith("eetq") and peer is not None:
                # Same seed, same tokens: the int8 model's first loss must be the float model's, nearly.
                status = "ok" if abs(result.first_loss - peer.first_loss) < 0.02 * abs(peer.first_loss) else "WRONG"
            report.add(
                "train",
                case,
                name,
                f"{result.tokens_per_s:.0f} tok/s, {memory_text(result)}, first loss {result.first_loss:.3f}",
                versus,
                status,
            )
        del model
        free_memory()
    return results


# ---------------------------------------------------------------------------------------------- decode


def decode_models(setup: Setup) -> dict[str, nn.Module]:
    """The bfloat16 model with PEFT LoRA (the reference, measured first) and ours, from the same weights."""
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0)
    peer = peft_get_peft_model(build_float(setup.config, setup.device), lora)
    ours = eetq_lora.get_peft_model(eetq_lora.quantize_model(build_float(setup.config, setup.device)), lora)
    return {"peft-bf16": peer.eval(), "eetq": ours.eval()}


@contextlib.contextmanager
def compile_allowed(model: nn.Module) -> Iterator[None]:
    """Let transformers compile ``model``'s decoding even where its quantizer says it cannot."""
    base = model.get_base_model()
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is not None:
        base.hf_quantizer = None
    try:
        yield
    finally:
        if quantizer is not None:
            base.hf_quantizer = quantizer


def generate_rate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int, **options) -> float:
    """Median generated tokens per second of greedy ``generate`` (prefill included), after one warm-up call."""

    def run() -> float:
        if prompt.is_cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
                **options,
            )
        if prompt.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    run()
    return prompt.shape[0] * new_tokens / statistics.median([run() for _ in range(repeats)])


def graph_breaks() -> str:
    """How the last compilation went: graphs made, graph breaks and the most frequent reason for one."""
    counters = torch._dynamo.utils.counters
    breaks = counters["graph_break"]
    graphs = counters["stats"]["unique_graphs"]
    if not breaks:
        return f"{graphs} graph(s), no graph breaks"
    reason, count = breaks.most_common(1)[0]
    reason = " ".join(reason.split())[:100]
    return f"{graphs} graph(s), {sum(breaks.values())} graph breaks ({count}x: {reason})"


def decode_section(setup: Setup) -> dict[tuple[str, str, int], float]:
    report, device, rates = setup.report, setup.device, {}
    models = decode_models(setup)
    quantizer = getattr(models["eetq"].get_base_model(), "hf_quantizer", None)
    if quantizer is not None:
        report.add(
            "decode",
            "transformers auto-compile",
            "eetq",
            f"{'allowed' if quantizer.is_compileable else 'blocked'} by {type(quantizer).__name__}.is_compileable="
            f"{quantizer.is_compileable}; the compiled rows below lift that gate for the measurement",
        )
    generator = torch.Generator(device=device).manual_seed(0)
    prompts = {
        b: torch.randint(3, setup.config.vocab_size, (b, setup.prompt_len), device=device, generator=generator)
        for b in setup.decode_batches
    }
    modes = [("eager", {}, setup.decode_batches)]
    compile_config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
    if device.type != "cuda":
        compile_config._compile_all_devices = True  # the dry run compiles on the CPU
    modes.append(
        ("compiled", {"cache_implementation": "static", "compile_config": compile_config}, setup.compile_batches)
    )
    for mode, options, batches in modes:
        for batch in batches:
            for name, model in models.items():
                case = f"b={batch} {mode}, {setup.new_tokens} new tokens"
                if not setup.budget.allows("decode", f"{case}, {name}", setup.costs[f"decode {mode}"]):
                    continue
                try:
                    if mode == "compiled":
                        torch._dynamo.reset()
                        torch._dynamo.utils.counters.clear()
                    with compile_allowed(model) if mode == "compiled" else contextlib.nullcontext():
                        rate = generate_rate(model, prompts[batch], setup.new_tokens, setup.decode_repeats, **options)
                except Exception as error:  # noqa: BLE001 - a mode that fails is reported, not fatal
                    report.add("decode", case, name, f"failed: {one_line(error)}")
                    continue
                rates[(name, mode, batch)] = rate
                peer = rates.get(("peft-bf16", mode, batch))
                versus = f"{rate / peer:.2f}x peft-bf16" if peer and name != "peft-bf16" else ""
                note = f"; {graph_breaks()}" if mode == "compiled" else ""
                report.add("decode", case, name, f"{rate:.1f} tok/s{note}", versus)
            if mode == "compiled":
                torch._dynamo.reset()
    del models
    free_memory()
    return rates


# ---------------------------------------------------------------------------------------------- targets


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "miss")


def targets(setup: Setup, sections: set[str], train, decode, kernel) -> None:
    """A pass/miss row per target of the sections that ran."""
    report = setup.report
    for name in ("eetq", "eetq/library-step") if "train" in sections else ():
        for batch in setup.train_batches:
            ours, peer = train.get((name, batch)), train.get(("peft-bf16", batch))
            goal = f"train {name} b={batch}: >= {TRAIN_SPEED_MIN}x tok/s, <= {TRAIN_MEMORY_MAX}x peak of peft-bf16"
            if ours is None or peer is None:
                report.add("target", goal, name, "not measured", "", "n/a")
                continue
            speed, memory = ours.tokens_per_s / peer.tokens_per_s, ours.peak_bytes / peer.peak_bytes
            ok = None if math.isnan(memory) else speed >= TRAIN_SPEED_MIN and memory <= TRAIN_MEMORY_MAX
            memory_ratio = "" if math.isnan(memory) else f", {memory:.2f}x peak"
            report.add("target", goal, name, f"{speed:.2f}x tok/s{memory_ratio}", "", verdict(ok))
    for mode in ("eager", "compiled") if "decode" in sections else ():
        ours, peer = decode.get(("eetq", mode, 1)), decode.get(("peft-bf16", mode, 1))
        goal = f"decode b=1 {mode}: >= {DECODE_SPEED_MIN}x tok/s of peft-bf16"
        if ours is None or peer is None:
            report.add("target", goal, "eetq", "not measured", "", "n/a")
            continue
        ok = None if setup.dry_run else ours / peer >= DECODE_SPEED_MIN
        report.add("target", goal, "eetq", f"{ours / peer:.2f}x", "", verdict(ok))
    for name, in_features, out_features in layer_shapes(setup.config) if "kernel" in sections else ():
        if setup.config.intermediate_size not in (in_features, out_features):
            continue
        goal = f"kernel M=1 {in_features}x{out_features}: >= {KERNEL_COPY_FRACTION_MIN:.0%} of copy bandwidth"
        fraction = kernel.get(name)
        if fraction is None:
            report.add("target", goal, "triton forward", "not measured", "", "n/a")
            continue
        ok = None if setup.dry_run else fraction >= KERNEL_COPY_FRACTION_MIN
        report.add("target", goal, "triton forward", f"{fraction:.0%}", "", verdict(ok))


# ---------------------------------------------------------------------------------------------- main


def make_setup(args: argparse.Namespace, report: Report) -> Setup:
    device = torch.device("cpu" if args.dry_run else "cuda")
    budget = Budget(args.budget_s, report)
    layers = args.layers if args.layers is not None else (2 if args.dry_run else 32)
    config = llama_config(args.dry_run, layers)
    # Expected seconds per unit on an H100/H200 with 32 layers (scaled down with fewer).
    share = layers / 32
    costs = {
        "check": 30.0,
        "kernel": 20.0,
        "train build": 15.0,
        "train b1": 5.0 * share + 2,
        "train b4": 10.0 * share + 2,
        "decode build": 25.0,
        "decode eager": 10.0 * share + 2,
        "decode compiled": 60.0 * share + 10,
    }
    if args.dry_run:
        return Setup(
            device, True, args.quick, config, seq=64, train_batches=(1, 4), train_steps=1, decode_batches=(1, 16),
            compile_batches=(1,), prompt_len=8, new_tokens=6, decode_repeats=1, check_rows=(1, 16, 80),
            clock=Clock(device, repeats=2), budget=budget, report=report, costs=costs,
        )  # fmt: skip
    return Setup(
        device, False, args.quick, config, seq=2048, train_batches=(1, 4), train_steps=2 if args.quick else 3,
        decode_batches=(1, 16), compile_batches=(1, 16), prompt_len=32, new_tokens=32 if args.quick else 64,
        decode_repeats=1 if args.quick else 3, check_rows=(1, 16, 2048),
        clock=Clock(device, repeats=10 if args.quick else 30), budget=budget, report=report, costs=costs,
    )  # fmt: skip


def run_sections(setup: Setup, only: str | None) -> None:
    report, budget = setup.report, setup.budget
    train: dict = {}
    decode: dict = {}
    kernel: dict = {}
    if only in (None, "kernel"):
        if budget.allows("check", "layer shapes", setup.costs["check"]):
            check_section(setup)
        if budget.allows("kernel", "M=1 read rates", setup.costs["kernel"]):
            bandwidth = copy_gbps(setup.clock, setup.device)
            report.add("kernel", "device-to-device copy", "torch copy_", f"{bandwidth:.0f} GB/s (read + write)")
            kernel = kernel_section(setup, bandwidth)
    if only in (None, "train"):
        train = train_section(setup)
    if only in (None, "decode") and budget.allows("decode", "build both models", setup.costs["decode build"]):
        decode = decode_section(setup)
    for error in triton_failures():
        report.add(
            "check", "dispatch", "cuda-triton", f"Triton failed, reference path used after: {error[:200]}", "", "WRONG"
        )
    targets(setup, {only} if only else {"kernel", "train", "decode"}, train, decode, kernel)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and decoding steps")
    parser.add_argument(
        "--only", choices=("kernel", "train", "decode"), help="one section (kernel includes the checks)"
    )
    parser.add_argument("--layers", type=int, help="decoder layers (default 32; 2 in a dry run)")
    parser.add_argument("--budget-s", type=float, help="skip what would end after this many seconds (default 420)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, Triton through its interpreter")
    args = parser.parse_args()
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.budget_s is None:
        args.budget_s = 1800.0 if args.dry_run else 420.0
    if not args.dry_run and not (torch.cuda.is_available() and triton_kernels.is_available()):
        has_triton = triton_kernels.triton is not None
        print(f"needs a CUDA GPU and triton (cuda={torch.cuda.is_available()}, triton={has_triton}); try --dry-run")
        return 2
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    report = Report()
    setup = make_setup(args, report)
    if args.dry_run:
        name = "CPU (dry run: Triton interpreter, tiny shapes)"
    else:
        name = f"{torch.cuda.get_device_name()} {torch.cuda.get_device_capability()}"
    packages = []
    for module in ("transformers", "peft", "torchao", "bitsandbytes"):
        try:
            packages.append(f"{module} {__import__(module).__version__}")
        except Exception:  # noqa: BLE001 - any import failure means the package is unusable here
            packages.append(f"{module} not installed")
    versions = f"torch {torch.__version__}, triton {getattr(triton_kernels.triton, '__version__', None)}, " + ", ".join(
        packages
    )
    config = setup.config
    print(f"device: {name}; {versions}")
    print(
        f"model: hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
        f"{config.num_hidden_layers} layers, "
        f"{config.num_attention_heads}/{config.num_key_value_heads} heads, vocabulary {config.vocab_size}; "
        f"budget {args.budget_s:.0f} s"
    )
    setup.budget.arm(grace=40.0)
    try:
        run_sections(setup, args.only)
    except BudgetSpent:
        report.add(
            "run", "time budget", "-", f"stopped: past {args.budget_s:.0f} s + 40 s; the rows above are complete"
        )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    print(f"\n## {name}, {config.num_hidden_layers} layers, {time.monotonic() - START:.0f} s\n")
    print(report.markdown())
    print("\nall checks correct" if not report.wrong else f"\n{report.wrong} WRONG results")
    return 1 if report.wrong else 0


if __name__ == "__main__":
    sys.exit(main())
