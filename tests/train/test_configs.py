"""jmoe.train.configs: the repository's config files by name or path."""

import os

import pytest

from jmoe.train import configs


def test_load_by_name_and_by_path():
    assert {"digits_moe", "lm_tiny"} <= set(configs.available())
    by_name = configs.load("digits_moe")
    by_path = configs.load(os.path.join(configs.CONFIG_DIR, "digits_moe.py"))
    assert by_name.to_dict() == by_path.to_dict()
    assert by_name.data.kind == "digits"


def test_loads_are_independent():
    a = configs.load("lm_tiny")
    a.train.steps = 3
    assert configs.load("lm_tiny").train.steps != 3


def test_missing_config_names_the_file_and_the_choices():
    with pytest.raises(FileNotFoundError, match=r"no_such_config\.py.*lm_tiny"):
        configs.load("no_such_config")
