"""The config's pydantic models: every key of every section refuses bad input in one line naming the key
path, the value and what is allowed (type, range, shapes, a did-you-mean), built from YAML, from
overrides, on their own or by `replace()`; and the rest of the repo imports the package, not its parts."""
import pathlib
import re

import pytest
from pydantic import BaseModel

from cluster.cli.main import main
from data.config import DataConfig
from trainer.config import TrackingSection, TrainConfig, config_from_dict

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = [name for name, field in TrainConfig.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)]
EVERY_KEY = [(section, key) for section in SECTIONS
             for key in TrainConfig.model_fields[section].annotation.model_fields]


def _refusal(raw=None, overrides=()) -> str:
    with pytest.raises(ValueError) as err:
        config_from_dict(raw or {}, list(overrides))
    message = str(err.value)
    assert "\n" not in message and "validation error" not in message and "pydantic" not in message
    return message


def test_the_sections_are_the_ten_the_yaml_files_use():
    assert SECTIONS == ["model", "data", "objective", "optim", "train", "checkpoint", "tracking", "samples",
                        "eval", "cluster"]


@pytest.mark.parametrize("section, key", EVERY_KEY, ids=lambda v: str(v))
def test_a_misspelt_key_of_every_section_gets_a_did_you_mean(section, key):
    message = _refusal({section: {key + "s": 1}})
    assert f"unknown key '{section}.{key}s' (did you mean '{key}'?)" in message
    assert f"valid keys of {section}: " in message


@pytest.mark.parametrize("section, key", EVERY_KEY, ids=lambda v: str(v))
def test_every_key_refuses_a_mapping_naming_the_key_and_the_expected_type(section, key):
    message = _refusal({section: {key: {"oops": 1}}})
    assert message.startswith(f"{section}.{key}={{'oops': 1}} is not valid: expected "), message
    assert re.search(r"expected (an integer|a number|true or false|a string|one of \[|a list of 2)", message)


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=2", "optim.lr=2.0 is not valid: expected a number in (0.0, 1.0]"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1]=1.0 is not valid: expected a number in [0.0, 1.0)"),
    ("train.max_steps=0", "train.max_steps=0 is not valid: expected an integer >= 1"),
    ("cluster.cpus_per_worker=2000", "cluster.cpus_per_worker=2000.0 is not valid: expected a number in (0.0, 1024.0]"),
    ("cluster.object_store_mb=32", "cluster.object_store_mb=32 is not valid: expected an integer >= 64"),
    ("objective.t_mean=11", "objective.t_mean=11.0 is not valid: expected a number in [-10.0, 10.0]"),
    ("data.resolution=4", "data.resolution=4 is not valid: expected an integer >= 8"),
])
def test_a_value_out_of_range_names_the_whole_range(override, fragment):
    assert fragment in _refusal(overrides=[override])


@pytest.mark.parametrize("raw, fragment", [
    ({"train": {"max_steps": 7.0}}, "train.max_steps=7.0 is not valid: expected an integer"),  # no silent 7
    ({"train": {"max_steps": True}}, "train.max_steps=True is not valid: expected an integer"),
    ({"train": {"zero_stage": True}}, "train.zero_stage=True is not valid"),
    ({"optim": {"lr": True}}, "optim.lr=True is not valid: expected a number"),
    ({"run_name": 7}, "run_name=7 is not valid: expected a string"),
    ({"data": {"pin_memory": "on"}}, "data.pin_memory='on' is not valid: expected true or false or null"),
    ({"cluster": {"num_workers": "four"}},
     "cluster.num_workers='four' is not valid: expected an integer >= 1 or a list of 2 integers"),
])
def test_lax_conversions_pydantic_would_make_are_refused(raw, fragment):
    assert fragment in _refusal(raw)


def test_yaml_strings_of_numbers_still_count_as_numbers():
    cfg = config_from_dict({"train": {"max_steps": "7"}, "optim": {"lr": 1}})
    assert cfg.train.max_steps == 7 and isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0


def test_several_problems_report_the_first_and_count_the_others():
    message = _refusal({"optim": {"lr": 2, "eps": 0}, "train": {"max_steps": 0}})
    assert message.startswith("optim.lr=2.0 is not valid") and message.endswith("(2 more problems after this one)")


def test_a_section_built_on_its_own_names_its_keys_like_the_file_does():
    with pytest.raises(ValueError, match=r"^tracking\.model_weights='link' is not valid: expected one of"):
        TrackingSection(model_weights="link")
    with pytest.raises(ValueError, match=r"^unknown key 'data\.batchsize' \(did you mean 'batch_size'\?\)"):
        DataConfig(batchsize=4)


def test_replace_validates_and_keeps_everything_else():
    cfg = config_from_dict({"train": {"max_steps": 5}, "data": {"resolution": 32}})
    longer = cfg.replace(train=cfg.train.replace(max_steps=9))
    assert longer.train.max_steps == 9 and longer.data == cfg.data and cfg.train.max_steps == 5
    with pytest.raises(ValueError, match=r"^train\.max_steps=0 is not valid: expected an integer >= 1$"):
        cfg.train.replace(max_steps=0)
    with pytest.raises(ValueError, match="data.resolution=40 is not valid: must be a multiple of the patch size"):
        cfg.replace(data=cfg.data.replace(resolution=40))  # the cross-section rules run again too


def test_dip_train_prints_one_line_and_exits_2_on_a_yaml_type_error(tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  max_steps: many\ncluster:\n  num_workerz: 2\n")
    assert main(["train", str(path), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "pydantic" not in err
    assert f"{path}: train.max_steps='many' is not valid: expected an integer >= 1" in err


def test_the_repo_imports_the_config_package_not_its_modules():
    inside = re.compile(r"from trainer\.config\.(sections|batch|overrides|compat) import|"
                        r"import trainer\.config\.(sections|batch|overrides|compat)")
    offenders = [str(p.relative_to(REPO)) for folder in ("trainer", "cluster", "tests", "benchmarks", "data", "models")
                 for p in (REPO / folder).rglob("*.py")
                 if "trainer/config/" not in p.as_posix() and inside.search(p.read_text())]
    assert offenders == []


def test_model_init_choices_are_the_models_own():
    import typing

    from models.dip import INIT_CHOICES
    from trainer.config import ModelSection

    assert set(typing.get_args(ModelSection.model_fields["init"].annotation)) == set(INIT_CHOICES)


def test_a_config_survives_pickling_and_deepcopy():  # Ray ships configs to actors; the loop copies them
    import copy
    import pickle

    cfg = config_from_dict({"cluster": {"num_workers": [1, 2]}, "train": {"max_steps": 3}})
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg
