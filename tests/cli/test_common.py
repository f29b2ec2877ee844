"""Flags every subcommand shares: --threads is bounded by the CPUs the process may use."""

import pytest

from eetq_lora.cli.common import usable_cpus
from eetq_lora.cli.main import build_parser


@pytest.mark.parametrize("command", [["finetune"], ["generate", "hi"], ["eval"], ["quantize", "src", "out"]])
def test_threads_beyond_the_usable_cpus_are_refused_in_one_line(command, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([*command, "--threads", str(usable_cpus() + 1)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"pass at most {usable_cpus()}" in error
    assert parser.parse_args([*command, "--threads", str(usable_cpus())]).threads == usable_cpus()


def test_an_unexpected_error_is_one_line_with_exit_code_1_unless_debugging(capsys, monkeypatch):
    from eetq_lora.cli.common import EXIT_ERROR, handles_errors

    @handles_errors("demo")
    def run(args):
        raise RuntimeError("the kernel broke\nsecond line of detail")

    monkeypatch.delenv("EETQ_LORA_DEBUG", raising=False)
    assert run(None) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "eetq-lora demo: error: RuntimeError: the kernel broke" in err and "EETQ_LORA_DEBUG=1" in err
    monkeypatch.setenv("EETQ_LORA_DEBUG", "1")
    with pytest.raises(RuntimeError, match="the kernel broke"):
        run(None)


@pytest.mark.parametrize("text", ["inf", "nan", "-1", "0", "1e400"])
def test_positive_numbers_must_be_finite(text):
    import argparse

    from eetq_lora.cli.common import positive_float

    with pytest.raises(argparse.ArgumentTypeError, match="finite number greater than 0"):
        positive_float(text)
    assert positive_float("0.5") == 0.5
