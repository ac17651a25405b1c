"""Experiment configs: shipped ones parse; typos and wrong types are refused by name."""

import pytest

from splitexit.errors import ConfigError, SplitexitError
from splitexit.train.config import config_from_dict, load_config, resolve_config, shipped_configs


def test_every_shipped_config_parses_and_validates() -> None:
    shipped = shipped_configs()
    assert {"fmnist-small", "fmnist-efficientnet"} <= set(shipped)
    for path in shipped.values():
        cfg = load_config(path)
        assert cfg.split.point and cfg.split.bits


def test_unknown_key_is_refused_with_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"stage2.*unknown key.*'alpah'.*valid keys"):
        config_from_dict({"stage2": {"alpah": 0.3}})


def test_wrong_type_is_refused_with_its_path() -> None:
    with pytest.raises(ConfigError, match=r"split\.channels: expected int"):
        config_from_dict({"split": {"channels": "eight"}})


def test_ints_are_accepted_where_floats_are_expected() -> None:
    cfg = config_from_dict({"teacher": {"optim": {"lr": 1}}})
    assert cfg.teacher.optim.lr == 1.0 and isinstance(cfg.teacher.optim.lr, float)


@pytest.mark.parametrize(
    "table, message",
    [
        ({"split": {"bits": [3]}}, "split.bits"),
        ({"split": {"channels": 4, "min_channels": 5}}, "min_channels"),
        ({"stage2": {"alpha": 1.5}}, "alpha"),
        ({"exits": {"measure": "vibes"}}, "exits.measure"),
        ({"teacher": {"optim": {"optimizer": "lion"}}}, "optimizer"),
        ({"data": {"image_size": [128]}}, "image_size"),
    ],
)
def test_invalid_values_are_refused(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(table)


def test_missing_and_malformed_files_say_what_is_wrong(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_config_names_resolve_to_shipped_files_and_unknown_names_list_them() -> None:
    assert resolve_config("fmnist-small").name == "fmnist-small.toml"
    with pytest.raises(SplitexitError, match="fmnist-small"):
        resolve_config("no-such-config")
