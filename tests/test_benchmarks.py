"""The GPU benchmark scripts' dry runs: every section on tiny shapes, on the CPU, Triton through its interpreter.

They are run by hand on a borrowed GPU, where a broken script costs the whole session; here each must
finish with its correctness checks passing.
"""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    ("script", "arguments", "verdict"),
    [
        ("gpu_check.py", ["--dry-run"], "all results correct"),
        ("gpu_model.py", ["--dry-run", "--quick"], "all checks correct"),
    ],
)
def test_gpu_benchmark_dry_runs_pass_their_checks(script, arguments, verdict):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *arguments],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=BENCHMARKS.parent,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert verdict in result.stdout
