"""Building the CPU kernels: cache reuse, and a clean fallback with one warning where it cannot work."""

import os
import stat
import subprocess
import warnings

import pytest
import torch

import eetq_lora.kernels as kernels
from eetq_lora.kernels import cpu_library, matmul_forward
from tests.kernels.helpers import float64_forward, float64_grad_input, int8_weight, relative_error


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """An empty kernel cache and no loaded library; the real one is reloaded afterwards."""
    monkeypatch.setenv("EETQ_LORA_CACHE", str(tmp_path))
    cpu_library._reset_for_tests()
    yield tmp_path
    cpu_library._reset_for_tests()


def _forward_still_matches():
    qweight, scales = int8_weight(64, 48)
    x = torch.randn(3, 64).bfloat16()
    assert relative_error(matmul_forward(x, qweight, scales), float64_forward(x, qweight, scales)) < 1.6e-2


def test_no_compiler_warns_once_and_falls_back(monkeypatch, fresh_native):
    monkeypatch.setattr(cpu_library, "_find_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler found") as record:
        assert cpu_library.library() is None
        assert cpu_library.library() is None
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert cpu_library.status()["available"] is False
    qweight, _ = int8_weight(64, 48)
    assert kernels.select_path("cpu", torch.bfloat16, 1, qweight).name != "cpu-stream"
    _forward_still_matches()


def test_failing_compiler_warns_and_falls_back(monkeypatch, fresh_native):
    monkeypatch.setattr(cpu_library, "_find_compiler", lambda: "/bin/false")
    with pytest.warns(RuntimeWarning, match="building the CPU kernels failed") as record:
        assert cpu_library.library() is None
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert "/bin/false" in cpu_library.status()["log"]
    _forward_still_matches()


def test_environment_disables_without_warning(monkeypatch, fresh_native):
    monkeypatch.setenv("EETQ_LORA_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_library.library() is None
    assert "EETQ_LORA_NATIVE" in cpu_library.status()["reason"]


@pytest.mark.skipif(cpu_library._find_compiler() is None, reason="no C compiler")
def test_build_is_cached_per_source_compiler_and_cpu(fresh_native):
    assert cpu_library.is_available()
    built = list((fresh_native / "kernels").glob("eetq_cpu_*.so"))
    assert len(built) == 1
    first_mtime = built[0].stat().st_mtime_ns
    cpu_library._reset_for_tests()
    assert cpu_library.is_available()
    assert cpu_library.status()["path"] == str(built[0])
    assert built[0].stat().st_mtime_ns == first_mtime
    assert cpu_library.library().eetq_has_openmp() in (0, 1)
    _forward_still_matches()


def _plant_library(path, marker) -> None:
    # What an attacker would leave: a library whose constructor runs as soon as it is loaded.
    source = path.with_suffix(".c")
    source.write_text(
        f"#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {{"
        f' FILE* f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'
    )
    subprocess.run([cpu_library._find_compiler(), "-shared", "-fPIC", str(source), "-o", str(path)], check=True)


needs_compiler = pytest.mark.skipif(cpu_library._find_compiler() is None, reason="no C compiler")
OTHER_USER = 54321


@needs_compiler
def test_kernel_folder_is_created_private(fresh_native):
    assert cpu_library.is_available()
    assert stat.S_IMODE(os.stat(fresh_native / "kernels").st_mode) == 0o700


@needs_compiler
def test_a_library_planted_in_the_shared_fallback_folder_is_never_loaded(monkeypatch, fresh_native):
    # The cache folder cannot be created (a file is in the way), so the per-user temp folder is
    # tried, which someone else created first and filled with a library of the expected name.
    blocker = fresh_native / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("EETQ_LORA_CACHE", str(blocker))
    shared_tmp = fresh_native / "tmp"
    shared_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(shared_tmp))
    monkeypatch.setattr(cpu_library.tempfile, "tempdir", None)
    planted_folder = cpu_library.fallback_cache_dir() / "kernels"
    planted_folder.mkdir(parents=True)
    marker = fresh_native / "planted-code-ran"
    _plant_library(planted_folder / f"eetq_cpu_{cpu_library._build_digest(cpu_library._find_compiler())}.so", marker)
    for folder in (planted_folder, planted_folder.parent):
        os.chmod(folder, 0o777)
        if os.getuid() == 0:
            os.chown(folder, OTHER_USER, OTHER_USER)
    with pytest.warns(RuntimeWarning, match="refusing to build or load compiled kernels") as record:
        assert cpu_library.library() is None
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert not marker.exists()
    _forward_still_matches()


@needs_compiler
def test_a_library_others_can_write_is_refused(fresh_native):
    assert cpu_library.is_available()
    (library,) = (fresh_native / "kernels").glob("eetq_cpu_*.so")
    os.chmod(library, 0o666)
    cpu_library._reset_for_tests()
    with pytest.warns(RuntimeWarning, match="writable by other users"):
        assert cpu_library.library() is None
    _forward_still_matches()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The builds other CPUs get: plain C (no vector extensions, no OpenMP) and AVX2 with F16C.
PORTABLE_BUILDS = [
    pytest.param(("-O3",), id="plain-c"),
    pytest.param(
        ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"),
        id="avx2",
        marks=pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= _cpu_flags(), reason="CPU without AVX2/FMA/F16C"),
    ),
]


@pytest.mark.skipif(cpu_library._find_compiler() is None, reason="no C compiler")
@pytest.mark.parametrize("flags", PORTABLE_BUILDS)
def test_portable_builds_compute_the_same_products(monkeypatch, fresh_native, flags):
    # This machine builds with -march=native; the kernels' scalar and AVX2 branches are what other
    # CPUs run, so they are built and checked here too.
    from eetq_lora.kernels import cpu, dispatch, stream

    monkeypatch.setattr(cpu_library, "_FLAG_SETS", (flags,))
    assert cpu_library.is_available() and not cpu_library.has_bf16_dot()
    for layout in ("in_out", "out_in"):
        qweight, scales = int8_weight(100, 37, layout)
        for dtype, budget in ((torch.float32, 1e-5), (torch.bfloat16, 2**-8), (torch.float16, 2**-11)):
            for rows in (1, 3, 8):
                x, grad = torch.randn(rows, 100).to(dtype), torch.randn(rows, 37).to(dtype)
                y = cpu.stream_forward(x, qweight, scales)
                dx = cpu.stream_grad_input(grad, qweight, scales)
                assert relative_error(y, float64_forward(x, qweight, scales)) < budget
                assert relative_error(dx, float64_grad_input(grad, qweight, scales)) < budget
    qweight, scales = int8_weight(100, 37)
    plan = stream.StreamPlan(qweight, scales)
    lora_a, lora_b = torch.randn(5, 100) / 10, torch.randn(37, 5) / 10
    x = torch.randn(1, 100).half()
    with torch.no_grad():
        out = dispatch.fused_adapter_forward(plan, x, lora_a, lora_b, 2.0)
    expected = float64_forward(x, qweight, scales) + x.double() @ lora_a.double().t() @ lora_b.double().t() * 2.0
    assert out.dtype == torch.float16 and relative_error(out, expected) < 2**-10


def test_the_source_ships_as_package_data_and_defines_its_abi_once():
    from importlib import resources

    shipped = resources.files("eetq_lora.kernels").joinpath(*cpu_library.SOURCE_PATH)
    assert shipped.is_file() and cpu_library.source() == shipped.read_text(encoding="utf-8")
    assert cpu_library.abi_version(cpu_library.source()) > 0
    assert cpu_library.abi_version("/* v */\n#define EETQ_ABI_VERSION 17\nint x;\n") == 17
    for broken in ("int x;\n", "#define EETQ_ABI_VERSION 1\n#define EETQ_ABI_VERSION 2\n"):
        with pytest.raises(RuntimeError, match="EETQ_ABI_VERSION exactly once"):
            cpu_library.abi_version(broken)


@needs_compiler
def test_the_loaded_library_reports_the_sources_abi(fresh_native):
    assert cpu_library.library().eetq_abi_version() == cpu_library.abi_version(cpu_library.source())


@needs_compiler
def test_a_library_of_another_abi_is_refused(monkeypatch, fresh_native):
    actual = cpu_library.abi_version(cpu_library.source())
    monkeypatch.setattr(cpu_library, "abi_version", lambda text: actual + 1)
    with pytest.warns(RuntimeWarning, match=f"has ABI {actual}, expected {actual + 1}") as record:
        assert cpu_library.library() is None
    assert len(record) == 1 and "\n" not in str(record[0].message)
    _forward_still_matches()


@needs_compiler
def test_the_build_compiles_and_is_keyed_by_the_exact_source_text(monkeypatch, fresh_native):
    assert cpu_library.is_available()
    (compiled,) = (fresh_native / "kernels").glob("eetq_cpu_*.c")
    assert compiled.read_text(encoding="utf-8") == cpu_library.source()
    compiler = cpu_library._find_compiler()
    digest = cpu_library._build_digest(compiler)
    assert compiled.name == f"eetq_cpu_{digest}.c"
    edited = cpu_library.source() + "\n"
    monkeypatch.setattr(cpu_library, "source", lambda: edited)
    assert cpu_library._build_digest(compiler) != digest
