"""The kernels' C source: it compiles without a single warning for every build it gets, runnable here
or not, and a row's result does not depend on the tile shapes that the other rows select."""

import platform
import subprocess

import pytest
import torch

from eetq_lora.kernels import cpu_library

COMPILER = cpu_library._find_compiler()
WARNINGS = ("-Wall", "-Wextra", "-Werror")

pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C compiler")


@pytest.fixture(scope="module")
def c_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("csrc") / "eetq_cpu.c"
    path.write_text(cpu_library.source())
    return path


def _compile_without_warnings(c_file, flags, output, *extra, required=False) -> None:
    """Compile with -Wall -Wextra -Werror. Where the flags do not build here even without those, the
    test is skipped, unless the build is ``required`` to work here."""
    command = [COMPILER, *flags, *extra, *cpu_library._COMMON_FLAGS, str(c_file), "-o", str(output)]
    strict = subprocess.run([*command, *WARNINGS], capture_output=True, text=True, timeout=300)
    if strict.returncode == 0:
        return
    plain = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if plain.returncode != 0:
        assert not required, f"{' '.join(flags)} does not build here:\n{plain.stderr}"
        pytest.skip(f"{COMPILER} cannot build with {' '.join(flags)} here")
    pytest.fail(f"{' '.join(flags)} builds with warnings:\n{strict.stderr}")


X86 = platform.machine() in ("x86_64", "AMD64")
# The builds the fallback order ends on on x86: they must work here, not only compile cleanly.
REQUIRED = {("-O3",), ("-O3", "-march=native", "-fopenmp")} if X86 else {("-O3",)}


@pytest.mark.parametrize("flags", cpu_library._FLAG_SETS, ids=" ".join)
def test_production_builds_have_no_warnings(c_file, tmp_path, flags):
    _compile_without_warnings(c_file, flags, tmp_path / "eetq_cpu.so", required=flags in REQUIRED)


AVX512 = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl")
OTHER_X86_BUILDS = [
    # What CPUs without AVX-512 get from -march=native, down to plain AVX.
    pytest.param(("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"), False, id="avx2"),
    pytest.param(("-O3", "-mavx", "-fopenmp"), False, id="avx"),
    pytest.param((*AVX512, "-fopenmp"), False, id="avx512"),
    pytest.param((*AVX512, "-mavx512bf16", "-fopenmp"), True, id="avx512-bf16"),
    pytest.param((*AVX512, "-mavx512bf16"), True, id="avx512-bf16-no-openmp"),
]


@pytest.mark.skipif(not X86, reason="x86 instruction sets")
@pytest.mark.parametrize(("flags", "bf16"), OTHER_X86_BUILDS)
def test_builds_for_other_x86_cpus_have_no_warnings(c_file, tmp_path, flags, bf16):
    # Compiled to assembly only, since this CPU may not run them; the vector paths are checked for.
    assembly = tmp_path / "eetq_cpu.s"
    _compile_without_warnings(c_file, flags, assembly, "-S")
    text = assembly.read_text()
    assert ("eetq_rowdot_bf16:" in text and "vdpbf16ps" in text) == bf16
    assert ("zmm" in text) == ("-mavx512f" in flags)
    assert "ymm" in text


def _product(kernel, a, q, threads):
    lib = cpu_library.library()
    rows, columns = q.shape
    out = torch.empty(a.shape[0], columns if kernel == "rowaxpy" else rows)
    status = getattr(lib, f"eetq_{kernel}")(
        a.data_ptr(),
        a.shape[0],
        a.stride(0),
        q.data_ptr(),
        rows,
        columns,
        q.stride(0),
        None,
        None,
        out.data_ptr(),
        out.shape[1],
        threads,
    )
    assert status == 0
    return out


@pytest.mark.skipif(not cpu_library.is_available(), reason="no compiled kernels")
@pytest.mark.parametrize("kernel", ["rowaxpy", "rowdot"])
@pytest.mark.parametrize("shape", [(67, 45), (130, 203), (9, 1000), (1000, 9)])
def test_a_rows_result_does_not_depend_on_the_rows_with_it(kernel, shape):
    # Each count of activation rows takes its own tiles (and remainder paths), all of which sum the
    # same products in the same order with fused multiply-adds.
    torch.manual_seed(0)
    q = torch.randint(-128, 128, shape, dtype=torch.int8)
    a = torch.randn(9, shape[0] if kernel == "rowaxpy" else shape[1])
    alone = torch.cat([_product(kernel, a[i : i + 1], q, 1) for i in range(9)])
    for rows in range(2, 10):
        assert torch.equal(_product(kernel, a[:rows], q, 1), alone[:rows]), rows
    if kernel == "rowdot":
        # Threads split rowdot's weight rows, never a sum.
        assert torch.equal(_product(kernel, a, q, 2), alone)
