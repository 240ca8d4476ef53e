"""A minimal tensor-parallel GPT decoder: config (ModelArgs), model (GPT), checkpoint loading,
sampling and batched generation with a static KV cache."""
from tp_kernels.models.config import PRESETS, ModelArgs
from tp_kernels.models.generation import GenerationStats, generate
from tp_kernels.models.gpt import GPT, KVCache

__all__ = ["GPT", "KVCache", "ModelArgs", "PRESETS", "GenerationStats", "generate"]
