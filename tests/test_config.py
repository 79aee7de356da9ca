"""Composing configs: groups, presets, overrides, and the checks a bad value meets."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from metakd_run.config import ConfigError, validate


def test_default_config_is_the_sinusoid_experiment(compose):
    cfg = compose()
    assert cfg.dataset.name == "sinusoid"
    assert list(cfg.teacher.hidden) == [40, 40]
    assert list(cfg.student.hidden) == [10, 10]
    assert cfg.meta.first_order is False
    validate(cfg)


def test_overrides_reach_every_group(compose):
    cfg = compose(
        "meta.inner_lr=0.02",
        "meta.inner_steps=5",
        "kd=cosine",
        "kd.weight=0.5",
        "student.hidden=[20,20]",
        "dataset.shots=5",
        "train.iterations=2000",
        "seed=3",
    )
    assert cfg.meta.inner_lr == 0.02 and cfg.meta.inner_steps == 5
    assert cfg.kd.distance == "cosine" and cfg.kd.weight == 0.5
    assert list(cfg.student.hidden) == [20, 20]
    assert cfg.dataset.shots == 5 and cfg.train.iterations == 2000 and cfg.seed == 3
    validate(cfg)


@pytest.mark.parametrize(
    "option,key,value",
    [
        ("meta=fomaml", "first_order", True),
        ("meta=metasgd", "learn_inner_lr", True),
        ("meta=anil", "anil", True),
    ],
)
def test_meta_group_options(compose, option, key, value):
    assert compose(option).meta[key] == value


def test_wrong_type_fails_at_composition(compose):
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose("meta.inner_lr=fast")
    assert "inner_lr" in str(info.value) or "inner_lr" in str(info.value.__cause__)


def test_unknown_key_fails_at_composition(compose):
    with pytest.raises(ConfigCompositionException):
        compose("meta.innerlr=0.1")


@pytest.mark.parametrize(
    "override,key",
    [
        ("meta.inner_lr=-0.1", "meta.inner_lr"),
        ("dataset.shots=0", "dataset.shots"),
        ("meta.meta_batch=0", "meta.meta_batch"),
        ("kd.weight=-1", "kd.weight"),
        ("kd.distance=euclid", "kd.distance"),
        ("eval.report_steps=[0,20]", "eval.report_steps"),
        ("student.hidden=[]", "student.hidden"),
        ("train.stages=[teacher,students]", "train.stages"),
        ("meta.batching=gpu", "meta.batching"),
    ],
)
def test_out_of_range_values_name_the_key(compose, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose(override))


def test_image_presets_compose(compose):
    for name in ("omniglot_5w1s", "omniglot_5w1s_cpu", "miniimagenet_5w1s_cpu"):
        try:
            cfg = compose(f"experiment={name}")
        except ConfigCompositionException:
            pytest.skip("image presets not present")
        assert cfg.dataset.name in ("omniglot", "miniimagenet")
        assert cfg.teacher.name == "conv4"
        validate(cfg)
