import pytest
import torch
import transformers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

transformers.utils.logging.disable_progress_bar()  # weight-loading bars would drown test output

TINY = {
    "vocab_size": 99,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}

#: Gemma: 6 layers alternating sliding-window (16 tokens) and full attention, so prompts outgrow the window and the
#: three full-attention layers form groups of their own.
_GEMMA = {"head_dim": 8, "num_hidden_layers": 6, "sliding_window": 16}
_ALTERNATING = ["sliding_attention", "full_attention"] * 3
TINY_FAMILIES = {
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {**_GEMMA, "layer_types": _ALTERNATING}),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {**_GEMMA, "layer_types": _ALTERNATING}),
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    # Half the head rotated (Phi-3's partial_rotary_factor), the other half passed through.
    "phi3": (Phi3Config, Phi3ForCausalLM, {"pad_token_id": 0, "partial_rotary_factor": 0.5}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),
}


def build_tiny(family: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = TINY_FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    return model_cls(config).eval()


def assert_decodes_like(model, reference, cache, prompt: torch.Tensor, steps: int = 20) -> None:
    """``cache`` gives ``reference``'s logits (1e-4) over ``prompt`` and ``steps`` greedy decode steps."""
    from xkv.compat import cache_kwargs

    with torch.no_grad():
        expected, got = (model(prompt, **cache_kwargs(c)).logits for c in (reference, cache))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        for _ in range(steps):
            token = expected[:, -1:].argmax(-1)
            expected, got = (model(token, **cache_kwargs(c)).logits for c in (reference, cache))
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="session")
def tiny_llama():
    return build_tiny("llama")


@pytest.fixture(scope="session")
def smollm2():
    from xkv.models import load

    torch.set_num_threads(2)
    return load("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2):
    """A random 4-layer Llama with SmolLM2's tokenizer, saved: a ``--model`` path whose runs take seconds."""
    _, tokenizer = smollm2
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=2,  # head_dim 32: quanto's groups of 64 values need kv_heads * head_dim % 64 == 0
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
