"""The run config: strict loading, clear errors, typed overrides, resume compatibility."""
import glob
import os
import re

import pytest

from data.config_model import ConfigModel
from trainer.config import (TrainConfig, config_from_dict, config_hash, flatten, load_config, parse_override,
                            resume_incompatibilities, to_dict, to_yaml)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
SHIPPED = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


def test_the_four_shipped_configs_exist():
    names = {os.path.basename(p) for p in SHIPPED}
    assert {"quickstart_cpu.yaml", "dip_xl16_256.yaml", "dip_xl32_512.yaml", "dip_xl64_1024.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_config_loads_and_states_its_batch_arithmetic(path):
    cfg = load_config(path)
    text = open(path).read()
    stated = re.search(r"micro-batch (\d+) x (\d+) \w+ x (\d+) accumulation = (\d+)", text)
    assert stated, f"{path} must state its batch arithmetic"
    micro, workers, accum, total = map(int, stated.groups())
    assert (micro, workers, accum) == (cfg.data.batch_size, cfg.cluster.num_workers, cfg.train.grad_accum)
    assert total == micro * workers * accum == cfg.global_batch


def test_paper_recipe_matches_the_spec():
    cfg = load_config(os.path.join(CONFIG_DIR, "dip_xl16_256.yaml"))
    assert cfg.model.name == "DiP-XL/16" and cfg.data.resolution == 256
    assert cfg.global_batch == 256
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 0 and cfg.optim.ema_decay == 0.9999
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.objective.label_dropout == 0.1 and not cfg.objective.repa_enabled
    assert cfg.train.precision == "bf16"


def test_quickstart_fits_the_two_core_machine():
    cfg = load_config(os.path.join(CONFIG_DIR, "quickstart_cpu.yaml"))
    assert cfg.cluster.num_workers == 2 and cfg.train.zero_stage == 2 and not cfg.cluster.use_gpu
    assert cfg.data.is_synthetic and cfg.model.name == "DiP-T/16"


def test_unknown_key_names_itself_the_valid_keys_and_a_close_match(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ValueError) as err:
        load_config(str(path))
    message = str(err.value)
    assert "optim.lrr" in message and "did you mean 'lr'" in message
    assert "weight_decay" in message and str(path) in message


def test_unknown_section_is_named_with_the_valid_sections():
    with pytest.raises(ValueError, match=r"unknown key 'optimizer' \(did you mean 'optim'\?\).*checkpoint"):
        config_from_dict({"optimizer": {"lr": 1e-3}})


@pytest.mark.parametrize("raw, fragment", [
    ({"train": {"zero_stage": 4}}, "train.zero_stage=4 is not valid: choose one of [0, 1, 2, 3]"),
    ({"train": {"precision": "fp16"}}, "train.precision='fp16' is not valid"),
    ({"optim": {"lr": "fast"}}, "optim.lr='fast' is not valid: expected a number"),
    ({"optim": {"lr": -1.0}}, "optim.lr=-1.0 is not valid"),
    ({"train": {"max_steps": 2.5}}, "train.max_steps=2.5 is not valid: expected an integer"),
    ({"train": {"nonfinite_patience": 0}}, "train.nonfinite_patience=0 is not valid: expected an integer >= 1"),
    ({"train": {"max_rollbacks": -1}}, "train.max_rollbacks=-1 is not valid: expected an integer >= 0"),
    ({"checkpoint": {"async_save": "yes"}}, "checkpoint.async_save='yes' is not valid: expected true or false"),
    ({"optim": {"betas": [0.9]}}, "optim.betas=[0.9] is not valid: expected a list of 2 numbers"),
    ({"model": {"name": "DiP-XXL/16"}}, "model.name='DiP-XXL/16' is not valid"),
    ({"model": {"init": "he"}}, "model.init='he' is not valid: expected one of ['authors', 'variance_preserving']"),
    ({"data": {"format": "tfrecord"}}, "data.format='tfrecord' is not valid"),
    ({"data": {"resolution": 40}}, "data.resolution=40 is not valid: must be a multiple of the patch size 16"),
    ({"eval": {"enabled": True}}, "eval.ref_stats"),
    ({"eval": {"ref_samples": 0}}, "eval.ref_samples=0 is not valid"),
    ({"eval": {"start_timeout_s": 0}}, "eval.start_timeout_s=0.0 is not valid"),
    ({"eval": {"enabled": True, "ref_stats": "ref.npz", "every_steps": 300}, "checkpoint": {"every_steps": 200}},
     "eval.every_steps=300 is not valid: must be a multiple of checkpoint.every_steps=200"),  # would skip evals
    ({"cluster": {"dashboard": "yes"}}, "cluster.dashboard='yes' is not valid: expected true or false"),
    ({"train": "fast"}, "train must be a mapping"),
    ({"tracking": {"system_metrics": "on"}}, "tracking.system_metrics='on' is not valid: expected true or false"),
    ({"tracking": {"system_metrics_interval_s": 0}}, "tracking.system_metrics_interval_s=0.0 is not valid"),
    ({"tracking": {"model_weights": "link"}},
     "tracking.model_weights='link' is not valid: expected one of ['auto', 'copy', 'reference']"),
    ({"tracking": {"model_copy_max_mb": -1}}, "tracking.model_copy_max_mb=-1.0 is not valid"),
    ({"tracking": {"register_model": "team/dip"}}, "tracking.register_model='team/dip' is not valid"),
    ({"cluster": {"max_failures": -2}},  # what the special value means, with the range
     "cluster.max_failures=-2 is not valid: expected an integer >= -1 (-1 = retry forever)"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(raw, fragment):
    with pytest.raises(ValueError) as err:
        config_from_dict(raw)
    assert fragment in str(err.value)


def test_yaml_style_exponents_are_numbers():
    # PyYAML reads "1e-4" as a string; a float field takes it as the number it means
    cfg = config_from_dict({"optim": {"lr": "1e-4"}})
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)


def test_overrides_are_typed_like_the_file():
    cfg = config_from_dict({}, ["optim.lr=3e-4", "train.max_steps=7", "checkpoint.async_save=true",
                                "optim.betas=[0.9, 0.95]", "run_name=007", "data.path=/tmp/x", "cluster.address="])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.max_steps == 7 and cfg.checkpoint.async_save is True
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.run_name == "007"  # strings stay strings
    assert cfg.data.path == "/tmp/x" and cfg.cluster.address == ""


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=1", "did you mean 'lr'"),
    ("optim=1", "names a whole section"),
    ("nokey", "expected key=value"),
    ("train.max_steps=many", "train.max_steps='many' is not valid"),
    ("train.zero_stage=9", "choose one of [0, 1, 2, 3]"),
])
def test_bad_overrides_are_refused_clearly(override, fragment):
    with pytest.raises(ValueError) as err:
        config_from_dict({}, [override])
    assert fragment in str(err.value)


def test_round_trip_through_dict_and_yaml():
    import yaml

    cfg = load_config(os.path.join(CONFIG_DIR, "quickstart_cpu.yaml"), ["optim.lr=2e-3"])
    assert config_from_dict(to_dict(cfg)) == cfg
    assert config_from_dict(yaml.safe_load(to_yaml(cfg))) == cfg


def test_hash_follows_content_and_flatten_gives_dotted_params():
    a = config_from_dict({})
    b = config_from_dict({}, ["optim.lr=2e-4"])
    assert config_hash(a) == config_hash(config_from_dict({})) != config_hash(b)
    flat = flatten(a)
    assert flat["optim.lr"] == "0.0001" and flat["train.zero_stage"] == "2" and flat["optim.betas"] == "[0.9, 0.999]"


def test_resume_refuses_a_different_model_shape_but_not_a_longer_run():
    saved = to_dict(config_from_dict({"model": {"name": "DiP-T/16", "num_classes": 10}}))
    longer = config_from_dict({"model": {"name": "DiP-T/16", "num_classes": 10, "activation_checkpointing": True,
                                         "init": "variance_preserving"},
                               "train": {"max_steps": 99999}, "optim": {"lr": 5e-4}})
    assert resume_incompatibilities(saved, longer) == []
    wider = config_from_dict({"model": {"name": "DiP-S/16", "num_classes": 10}})
    problems = resume_incompatibilities(saved, wider)
    assert any("hidden_size was 64, now 384" in p for p in problems)
    restaged = config_from_dict({"model": {"name": "DiP-T/16", "num_classes": 10}, "train": {"zero_stage": 3}})
    assert any("zero_stage was 2, now 3" in p for p in resume_incompatibilities(saved, restaged))


def test_every_section_is_a_strict_validated_model():
    for name in TrainConfig.model_fields:
        if name in ("run_name", "output_dir"):
            continue
        section = getattr(TrainConfig(), name)
        assert isinstance(section, ConfigModel) and type(section).model_config["extra"] == "forbid", name


def test_parse_override_reports_the_path_and_value():
    assert parse_override("train.seed=3") == (["train", "seed"], 3)
    assert parse_override("tracking.uri=http://127.0.0.1:5000") == (["tracking", "uri"], "http://127.0.0.1:5000")
