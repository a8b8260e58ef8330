import dataclasses
import json

import pytest

from xkv import XKVCache, XKVConfig
from xkv.config import parse_rank

BAD_VALUES = [
    ({"group_size": 0}, "group_size"),
    ({"group_size": -3}, "group_size"),
    ({"group_size": 2.5}, "group_size"),
    ({"grouping": "random"}, "grouping"),
    ({"first_layer": -1}, "first_layer"),
    ({"first_layer": 5, "last_layer": 2}, "last_layer"),
    ({"last_layer": "end"}, "last_layer"),
    ({"rank_k": 0}, "rank_k"),
    ({"rank_v": -4}, "rank_v"),
    ({"rank_k": 1.5}, "rank_k"),
    ({"rank_k": 0.0}, "rank_k"),
    ({"rank_v": "1x"}, "rank_v"),
    ({"rank_v": "0.5x"}, "rank_v"),
    ({"rank_k": "eight"}, "rank_k"),
    ({"rank_k": True}, "rank_k"),
    ({"rank_k": []}, "rank_k"),
    ({"rank_k": [8, 0]}, r"rank_k\[1\]"),
    ({"compress_keys": "yes"}, "compress_keys"),
    ({"svd": "qr"}, "svd"),
    ({"svd_oversample": -1}, "svd_oversample"),
    ({"svd_niter": -1}, "svd_niter"),
    ({"svd_niter": 0.3}, "svd_niter. must be a multiple of 0.5"),
    ({"svd_niter": True}, "svd_niter"),
    ({"svd_niter": "1"}, "svd_niter"),
    ({"grouping": "auto"}, "grouping: auto. needs .groups"),
    ({"groups": [[0, 1]]}, "groups"),
    ({"grouping": "auto", "groups": []}, "groups"),
    ({"grouping": "auto", "groups": [[0, 1], [1, 2]]}, "groups. lists a layer twice"),
    ({"grouping": "auto", "groups": [[0, -1]]}, "groups"),
    ({"grouping": "auto", "group_size": 2, "groups": [[0, 1, 2]]}, "larger than .group_size"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD_VALUES)
def test_invalid_value_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        XKVConfig(**kwargs)


def test_svd_niter_takes_half_iterations():
    assert XKVConfig(svd_niter=0.5).svd_niter == 0.5
    whole = XKVConfig(svd_niter=2.0).svd_niter  # one setting whether written 2 or 2.0
    assert whole == 2 and isinstance(whole, int)


def test_rank_forms():
    assert parse_rank(64, "r").kind == "rank"
    assert parse_rank(0.5, "r").kind == "fraction"
    factor = parse_rank("2.67x", "r")
    assert (factor.kind, factor.value) == ("factor", 2.67)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    config = XKVConfig(
        group_size=4, grouping="stride", rank_k=[16, "6x"], rank_v=0.5, last_layer=3, svd="randomized", svd_niter=0.5
    )
    path = tmp_path / f"cfg{suffix}"
    config.save(path)
    assert XKVConfig.load(path) == config
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"group_size": 4, "rank": 8}))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['rank'\]"):
        XKVConfig.load(path)


def test_bad_value_in_file_names_file_and_field(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("group_size: 0\n")
    with pytest.raises(ValueError, match=r"cfg\.yaml.*group_size"):
        XKVConfig.load(path)


def test_unparsable_and_wrong_suffix(tmp_path):
    bad = tmp_path / "cfg.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        XKVConfig.load(bad)
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
        XKVConfig.load(tmp_path / "cfg.toml")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
        XKVConfig().save(tmp_path / "cfg.txt")
    with pytest.raises(ValueError, match="mapping"):
        XKVConfig.from_dict([1, 2])


def test_frozen_and_replace_revalidates():
    config = XKVConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.group_size = 2
    with pytest.raises(ValueError, match="group_size"):
        dataclasses.replace(config, group_size=0)


# Checks that need the model's shape happen when the cache is built.
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"first_layer": 4}, "first_layer"),
        ({"first_layer": 1, "last_layer": 9}, "last_layer"),
        ({"group_size": 2, "rank_k": 33}, "rank_k"),  # G*D = 2 * 16 = 32
        ({"group_size": 2, "rank_v": [8, 8, 8]}, "rank_v"),  # 2 groups, 3 ranks
    ],
)
def test_invalid_for_model_names_field(tiny_llama, kwargs, field):
    with pytest.raises(ValueError, match=field):
        XKVCache(tiny_llama, XKVConfig(**kwargs))


def test_lenient_forms_and_tuple_round_trip(tmp_path):
    import numpy as np

    assert parse_rank("8X", "r").value == 8.0
    assert parse_rank(np.int64(5), "r").kind == "rank"
    config = XKVConfig(rank_k=(4, "6x"), min_tokens=0)
    path = tmp_path / "c.yaml"
    config.save(path)
    assert XKVConfig.load(path) == config
    with pytest.raises(ValueError, match="min_tokens"):
        XKVConfig(min_tokens=-1)
