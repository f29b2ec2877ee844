"""Benchmark scripts on tiny shapes: the GPU scripts' dry runs (on the CPU, Triton through its
interpreter) must pass their correctness checks, and decode.py must print the tables the README names.

The GPU scripts are run by hand on a borrowed GPU, where a broken script costs the whole session.
"""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(script: str, *arguments: str) -> str:
    """The script's standard output; it must exit 0."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *arguments],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=BENCHMARKS.parent,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize(
    ("script", "arguments", "verdict"),
    [
        ("gpu_check.py", ["--dry-run"], "all results correct"),
        ("gpu_model.py", ["--dry-run", "--quick"], "all checks correct"),
    ],
)
def test_gpu_benchmark_dry_runs_pass_their_checks(script, arguments, verdict):
    assert verdict in run_script(script, *arguments)


def test_decode_benchmark_prints_both_tables_under_each_wait_policy():
    # README: decode.py reports tokens/s against PEFT and the bandwidth bound, and where a token's time goes.
    out = run_script(
        "decode.py", "--layers", "1", "--new-tokens", "3", "--repeats", "1", "--configs", "eetq-fp32,peft-fp32"
    )
    assert "## OMP_WAIT_POLICY: libgomp's default (unset)" in out and "## OMP_WAIT_POLICY: PASSIVE" in out
    for policy_section in out.split("## OMP_WAIT_POLICY:")[1:]:
        rows = [line for line in policy_section.splitlines() if line.startswith("| eetq-fp32 |")]
        assert len(rows) == 2, policy_section  # the speed table and the time split
        speed, split = ([float(cell.strip().rstrip("x%")) for cell in row.strip("|").split("|")[1:]] for row in rows)
        assert speed[0] > 0 and speed[1] > 0  # tokens/s, ms/token
        lora, kernels, head, rest = split
        assert 0 < kernels <= lora and head > 0
