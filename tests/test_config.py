import math
import typing

import pytest

from zeroshot_adapt.config import (
    CONSTRAINTS,
    RunConfig,
    apply_mapping,
    apply_overrides,
    from_dict,
    iter_fields,
    load_yaml,
    save_yaml,
    validate_config,
)
from zeroshot_adapt.errors import UserError


def test_defaults_follow_the_official_imagenet_scripts():
    config = RunConfig()
    assert config.algorithm.tau == 0.4 and config.algorithm.threshold == 0.8
    assert config.algorithm.prior_momentum == 0.99 and config.algorithm.lambda_u == 10
    assert config.optim.mu == 5 and config.optim.batch_size == 64 and config.optim.lr == 0.003
    assert config.pseudo.tau_clip == 0.95 and config.student.ema_momentum == 0.999
    assert config.teacher.model == "RN50-quickgelu" and config.teacher.pretrained == "openai"


def test_dotted_overrides_are_typed():
    config = apply_overrides(
        RunConfig(), ["algorithm.tau=0.5", "algorithm.multiview=true", "student.pretrained=none", "optim.epochs=3",
                      "algorithm.extra.temperature=0.4", "algorithm.clip_fill_threshold=0.4"]
    )
    assert config.algorithm.tau == 0.5 and config.algorithm.multiview is True
    assert config.student.pretrained is None and config.optim.epochs == 3
    assert config.algorithm.extra == {"temperature": 0.4}
    assert config.algorithm.clip_fill_threshold == 0.4


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.taux=1", "unknown config key 'algorithm.taux'"),
        ("optim.epochs=many", "optim.epochs='many' is not a valid int"),
        ("algorithm.multiview=maybe", "not a boolean"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_value(override, message):
    with pytest.raises(UserError, match=message):
        apply_overrides(RunConfig(), [override])


def test_yaml_round_trip(tmp_path):
    config = apply_mapping(RunConfig(), {"algorithm": {"tau": 0.3}, "optim": {"epochs": 2}})
    save_yaml(config, tmp_path / "c.yaml")
    assert from_dict(load_yaml(tmp_path / "c.yaml")) == config


# --- validation of the resolved config (issue: no silent wrong result, no raw traceback) -----------------

def test_every_numeric_field_has_a_constraint():
    numeric = []
    for key, annotation, _ in iter_fields(RunConfig()):
        kinds = set(typing.get_args(annotation)) or {annotation}
        if kinds & {int, float}:
            numeric.append(key)
    assert numeric, "no numeric fields found"
    assert sorted(k for k in numeric if k not in CONSTRAINTS) == []
    assert sorted(k for k in CONSTRAINTS if k not in {key for key, _, _ in iter_fields(RunConfig())}) == []


def test_defaults_are_valid():
    assert validate_config(RunConfig()) == RunConfig()


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.epochs=-3", "optim.epochs (--epochs)=-3 must be >= 1"),
        ("optim.epochs=0", "optim.epochs (--epochs)=0 must be >= 1"),
        ("optim.lr=-1", "optim.lr=-1.0 must be > 0"),
        ("optim.lr=.nan", "optim.lr=nan must be a finite number"),
        ("optim.lr=nan", "optim.lr=nan must be a finite number"),
        ("algorithm.lambda_u=.inf", "algorithm.lambda_u=inf must be a finite number"),
        ("seed=-5", "seed (--seed)=-5 must be in [0, 4294967295]"),
        ("seed=4294967296", "seed (--seed)=4294967296 must be in [0,"),
        ("optim.grad_accum=0", "optim.grad_accum=0 must be >= 1"),
        ("checkpoint_every_steps=0", "checkpoint_every_steps=0 must be >= 1"),
        ("data.image_size=0", "data.image_size=0 must be >= 1"),
        ("optim.mixed_precision=fp64", "optim.mixed_precision='fp64' must be one of no, fp16, bf16"),
        ("teacher.shard_size=0", "teacher.shard_size=0 must be >= 1"),
        ("optim.batch_size=0", "optim.batch_size=0 must be >= 1"),
        ("pseudo.tau_clip=0", "pseudo.tau_clip (--tau-clip)=0.0 must be in (0, 1]"),
        ("algorithm.prior_momentum=1", "algorithm.prior_momentum=1.0 must be in [0, 1)"),
        ("run_dir=''", "run_dir (--run-dir)='' must be a non-empty string"),
    ],
)
def test_out_of_range_values_name_key_flag_and_range(override, message):
    config = apply_overrides(RunConfig(), [override])
    with pytest.raises(UserError) as error:
        validate_config(config)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.batch_size=2.7", "optim.batch_size=2.7 is not a valid int (whole numbers only"),
        ("optim.epochs=true", "optim.epochs=True is a boolean, not a valid int"),
        ("optim.lr=false", "optim.lr=False is a boolean"),
        ("run_dir=null", "run_dir needs a value"),
        ("optim.epochs=[1, 2", "the value given for optim.epochs is not valid YAML"),
    ],
)
def test_no_silent_conversions(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        apply_overrides(RunConfig(), [override])


def test_whole_floats_are_ints_and_every_problem_is_listed():
    assert apply_overrides(RunConfig(), ["optim.epochs=3.0"]).optim.epochs == 3
    config = apply_overrides(RunConfig(), ["optim.epochs=0", "optim.lr=-1"])
    with pytest.raises(UserError) as error:
        validate_config(config)
    assert "optim.epochs" in str(error.value) and "optim.lr" in str(error.value)


def test_cross_field_rules():
    with pytest.raises(UserError, match="divisible by optim.grad_accum=3"):
        validate_config(apply_overrides(RunConfig(), ["optim.grad_accum=3"]))
    # warm-up longer than the run is scaled down by the loop (config.warmup_steps), not refused
    assert validate_config(apply_overrides(RunConfig(), ["optim.epochs=2"])).optim.warmup_epochs == 5.0
    assert math.isclose(validate_config(apply_overrides(RunConfig(), ["optim.epochs=6"])).optim.warmup_epochs, 5.0)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"optim: {epochs: [", "is not valid YAML"),
        (b"\xff\xfe\x00garbage", "is not UTF-8 text"),
        (b"- a list\n", "must hold a mapping"),
    ],
)
def test_bad_config_files_are_named(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_yaml(path)


def test_config_file_that_is_a_directory(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        load_yaml(tmp_path)
