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
