"""Composing configs: every group option and preset on disk, overrides, the checks a bad value meets,
and the schema itself: each of its fields must be read by the code, so a setting that does nothing
cannot creep back in.

A value is refused either when Hydra composes the config (unknown key, wrong type, a choice that is
not one) or when the console script types it (:func:`metakd_run.config.to_typed`: the range checks);
both happen before any work. Registry choices that need the models built (taps, distances) are
tried through the real console script in ``test_user_errors.py``.
"""

from __future__ import annotations

import ast
import dataclasses
import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ValidationError

from metakd_run import config as schema
from metakd_run.config import ConfigError, to_typed
from tests.conftest import CONFIGS, ROOT

PACKAGE = ROOT / "metakd_run"


def options(group: str) -> list[str]:
    """A group's options: its YAML files on disk."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


EXPERIMENTS = options("experiment")
IMAGE_EXPERIMENTS = [
    e for e in EXPERIMENTS if e.startswith(tuple(d for d in options("dataset") if d != "sinusoid"))
]
SEARCHES = options("hparams_search")
# every folder of YAML options, nested groups (a/b) included; Hydra's own groups aside
USER_GROUPS = sorted(
    group
    for group in (d.relative_to(CONFIGS).as_posix() for d in CONFIGS.rglob("*") if d.is_dir())
    if not group.startswith("hydra") and options(group)
)


def job_config(cfg: DictConfig) -> DictConfig:
    """The config without Hydra's own node, as the task function receives it."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def refusal(compose, *overrides: str) -> str:
    """How composing and typing ``overrides`` fails, every message of the chain ('' if it does not)."""
    try:
        to_typed(compose(*overrides))
    except (ConfigCompositionException, ValidationError, ConfigError) as err:
        chain, e = [], err
        while e is not None:
            chain.append(str(e))
            e = e.__cause__
        return " | ".join(chain)
    return ""


# --- defaults and overrides ---------------------------------------------------------------------
def test_default_config_is_the_sinusoid_experiment(compose):
    cfg = to_typed(compose())
    assert cfg.dataset.name == "sinusoid"
    assert list(cfg.teacher.hidden) == [40, 40]
    assert list(cfg.student.hidden) == [10, 10]
    assert cfg.meta.first_order is False


def test_overrides_reach_every_group(compose):
    cfg = to_typed(
        compose(
            "meta.inner_lr=0.02",
            "meta.inner_steps=5",
            "kd=cosine",
            "kd.weight=0.5",
            "student.hidden=[20,20]",
            "dataset.shots=5",
            "train.iterations=2000",
            "seed=3",
        )
    )
    assert cfg.meta.inner_lr == 0.02 and cfg.meta.inner_steps == 5
    assert cfg.kd.distance == "cosine" and cfg.kd.weight == 0.5
    assert list(cfg.student.hidden) == [20, 20]
    assert cfg.dataset.shots == 5 and cfg.train.iterations == 2000 and cfg.seed == 3


@pytest.mark.parametrize(
    "option,key,value",
    [
        ("meta=fomaml", "first_order", True),
        ("meta=metasgd", "learn_inner_lr", True),
        ("meta=anil", "anil", True),
        ("meta=pretrain", "family", "pretrain"),
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
        ("eval.report_steps=[0,20]", "eval.report_steps"),
        ("student.hidden=[]", "student.hidden"),
        ("teacher.activation=swish", "teacher.activation"),
        ("train.stages=[teacher,students]", "train.stages"),
        ("meta.batching=gpu", "meta.batching"),
        ("meta.outer_schedule=linear", "meta.outer_schedule"),
        ("train.student_iterations=0", "train.student_iterations"),
        ("dtype=float16", "dtype"),
    ],
)
def test_out_of_range_values_name_the_key(compose, override, key):
    message = refusal(compose, override)
    assert message, f"{override} was accepted"
    assert key in message, message


def test_image_values_name_the_key(compose):
    assert "dataset.ways" in refusal(compose, "experiment=omniglot_5w1s", "dataset.ways=1")
    assert "student.filters" in refusal(compose, "experiment=omniglot_5w1s", "student.filters=0")


# --- every option of every group, every preset --------------------------------------------------
def _group_cases() -> list[tuple[str, str, list[str]]]:
    """(group, option, overrides that compose it with a data set and models it fits)."""
    # ~experiment: the default preset (sinusoid) sets the MLP student's widths
    images = ["~experiment", "dataset=omniglot", "model@teacher=conv4", "model@student=conv4"]
    cases = []
    for option in options("dataset"):
        cases.append(("dataset", option, [] if option == "sinusoid" else [images[0], *images[2:]]))
    for option in options("model"):
        fits = [] if option.startswith("mlp") else images[:2]
        cases.append(("model", option, [*fits, f"model@teacher={option}", f"model@student={option}"]))
    for group in ("meta", "kd"):
        cases += [(group, option, []) for option in options(group)]
    return cases


@pytest.mark.parametrize("group,option,extra", _group_cases(), ids=[f"{g}={o}" for g, o, _ in _group_cases()])
def test_every_group_option_composes_and_types(compose, group, option, extra):
    overrides = extra if group == "model" else [f"{group}={option}", *extra]
    cfg = to_typed(compose(*overrides))
    if group in ("meta", "kd", "dataset"):
        assert getattr(cfg, group).name == option


def test_the_options_are_exactly_the_yaml_files_and_no_schema():
    """What Hydra offers in each group is the YAML files: a schema is no option to pick."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import metakd_run.cli  # noqa: F401 - registers the structured configs

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group in USER_GROUPS:
            assert sorted(loader.get_group_options(group)) == options(group), group


@pytest.mark.parametrize("choice", ["kd=kd_schema", "meta=meta_schema", "model@teacher=mlp_schema"])
def test_a_schema_cannot_be_chosen(compose, choice):
    with pytest.raises(ConfigCompositionException):
        compose(choice)


@pytest.mark.parametrize("preset", EXPERIMENTS)
def test_every_experiment_preset_composes(compose, preset):
    """Each file of configs/experiment composes, types, and is the setting its name says."""
    cfg = to_typed(compose(f"experiment={preset}"))
    assert cfg.name == preset
    family = [d for d in options("dataset") if preset.startswith(d)]
    if family:  # omniglot_5w1s_cpu is an Omniglot preset
        assert cfg.dataset.name == family[0]
    shape = re.search(r"(\d+)w(\d+)s", preset)
    if shape:
        assert (cfg.dataset.ways, cfg.dataset.shots) == (int(shape[1]), int(shape[2]))


@pytest.mark.parametrize("preset", IMAGE_EXPERIMENTS)
def test_every_image_preset_takes_other_models(compose, preset):
    """``model@teacher=resnet12`` (and the student's) replaces the preset's conv4 and its settings."""
    cfg = to_typed(
        compose(
            f"experiment={preset}",
            "model@teacher=resnet12",
            "teacher.widths=[8,16,32,64]",
            "model@student=resnet12",
            "student.widths=[4,8,16,32]",
        )
    )
    assert cfg.teacher.name == "resnet12" and list(cfg.teacher.widths) == [8, 16, 32, 64]
    assert cfg.student.name == "resnet12" and list(cfg.student.widths) == [4, 8, 16, 32]


@pytest.mark.parametrize("preset", SEARCHES)
def test_every_search_preset_composes_and_searches_real_keys(compose, preset):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose(f"hparams_search={preset}", hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert params, "the search space is empty"
    job = job_config(cfg)
    for key in params:  # a key the config lacks would fail every trial
        assert OmegaConf.select(job, key, default="<absent>") != "<absent>", key
    to_typed(job)


# --- the schema: every field is read by the code ---------------------------------------------------
def schema_fields() -> list[str]:
    """``Class.field`` for every field of every dataclass of metakd_run/config.py (the schema that
    ``Config`` reaches, the per-option schemas of its ``Any`` groups included), under the class that
    declares it: a subclass that only changes a default declares no new setting."""
    found = []
    for obj in vars(schema).values():
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == schema.__name__:
            bases = [b for b in obj.__mro__[1:] if dataclasses.is_dataclass(b)]
            inherited = {f.name for b in bases for f in dataclasses.fields(b)}
            found += [f"{obj.__name__}.{f.name}" for f in dataclasses.fields(obj) if f.name not in inherited]
    return sorted(found)


def _template_patterns(node: ast.JoinedStr) -> list[re.Pattern]:
    """``f"{role}_split"`` reads ``train_split``, ``val_split``, ...: one pattern per dotted piece."""
    template = "".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values)
    out = []
    for piece in template.split("."):
        if "\0" in piece and re.search(r"[A-Za-z]", piece.replace("\0", "")):
            out.append(re.compile("".join(r"\w+" if c == "\0" else re.escape(c) for c in piece)))
    return out


def _reads(tree: ast.AST) -> tuple[set[str], list[re.Pattern]]:
    names: set[str] = set()
    patterns: list[re.Pattern] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.update(re.findall(r"\w+", node.value))  # getattr(x, "key"), "train.iterations"
        elif isinstance(node, ast.JoinedStr):
            patterns += _template_patterns(node)
    return names, patterns


def code_reads() -> tuple[set[str], list[re.Pattern]]:
    """Names the package reads: attributes, string keys, f-string keys, YAML interpolations.

    config.py counts only outside ``__post_init__``: checking a value's range is not using it.
    """
    names: set[str] = set()
    patterns: list[re.Pattern] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        if path.name == "config.py" and path.parent == PACKAGE:
            skip = ("__post_init__", "check", "_range")
            parts: list[ast.AST] = [
                n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name not in skip
            ]
        else:
            parts = [tree]
        for part in parts:
            n, p = _reads(part)
            names |= n
            patterns += p
    for path in CONFIGS.rglob("*.yaml"):
        for ref in re.findall(r"\$\{([\w.]+)\}", path.read_text()):
            names.update(ref.split("."))
    return names, patterns


def test_every_schema_field_is_read_by_the_code():
    """A setting that no code reads does nothing (``train.stop_after`` was one); remove or wire it."""
    names, patterns = code_reads()
    unread = [
        f
        for f in schema_fields()
        if (field := f.split(".")[1]) not in names and not any(p.fullmatch(field) for p in patterns)
    ]
    assert not unread, f"schema fields read nowhere in metakd_run/: {unread}"
    assert len(schema_fields()) > 40  # the walk found the schema


def test_the_field_check_notices_an_unread_field():
    """The check itself can fail: a made-up field is not read, a real one is."""
    names, patterns = code_reads()
    assert "stop_after_this_made_up_setting" not in names
    assert "inner_lr" in names and "iterations" in names
