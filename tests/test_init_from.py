"""train.init_from without Ray: what loads (export and authors' files, EMA or raw), the allowed
differences (class count, REPA projector), the refusal before anything starts, and a warm start at a
higher resolution that trains with a lower loss than the same run from scratch."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from models import DiP, DiPConfig, export_official_state_dict
from tests.test_trainer_support import tiny_config
from trainer.checkpoint.init_from import LABEL_TABLE, InitMismatch, initialise_module, plan_init
from trainer.loop.engine import build_objective_module


def _source(num_classes: int = 4, seed: int = 1, **overrides) -> DiP:
    """A DiP-T/16 with weights unlike a fresh model's (another seed, then a nudge)."""
    torch.manual_seed(seed)
    model = DiP(_tiny_dip_config(num_classes, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def _tiny_dip_config(num_classes: int, **overrides) -> DiPConfig:
    from models.registry import dip_config

    return dataclasses.replace(dip_config("DiP-T/16", num_classes=num_classes), **overrides)


def _save_export(model: DiP, path) -> str:
    torch.save({"model_config": dataclasses.asdict(model.config), "state_dict": model.state_dict(),
                "trained_with": {"resolution": 32}}, path)
    return str(path)


def _cfg(tmp_path, init_from: str, *overrides: str):
    return tiny_config(tmp_path, "warm", [f"train.init_from={init_from}", *overrides])


def _init(cfg, tmp_path):
    module = build_objective_module(cfg)
    source = initialise_module(module, cfg, str(tmp_path / "own-checkpoints"), rank=0)
    return module, source


def _assert_equal_weights(a: dict, b: dict, skip=()) -> None:
    assert set(a) == set(b)
    for key in a:
        if key not in skip:
            assert torch.equal(a[key], b[key]), key


def test_a_dip_export_file_loads_as_init_and_the_ema_starts_from_it(tmp_path):
    source = _source()
    cfg = _cfg(tmp_path, _save_export(source, tmp_path / "model.pt"))
    module, found = _init(cfg, tmp_path)
    assert found.kind == "export" and found.parent_run_id is None
    _assert_equal_weights(module.denoiser.state_dict(), source.state_dict())
    assert not torch.equal(module.denoiser.state_dict()["s_embedder.proj.weight"],
                           build_objective_module(tiny_config(tmp_path, "scratch")).denoiser.state_dict()[
                               "s_embedder.proj.weight"])
    from trainer.loop.training_ema import build_training_ema  # built right after, from the loaded weights

    ema = build_training_ema(module.denoiser, 0.9, 2, 0, 1)
    _assert_equal_weights(ema.sampling_module().state_dict(), source.state_dict())


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_the_authors_layout_loads_its_ema_or_its_raw_weights(tmp_path, weights):
    raw, ema = _source(seed=1), _source(seed=2)
    path = tmp_path / "official.ckpt"
    torch.save(export_official_state_dict(raw, ema), path)
    cfg = _cfg(tmp_path, str(path), f"train.init_weights={weights}")
    module, found = _init(cfg, tmp_path)
    assert found.kind == "official"
    _assert_equal_weights(module.denoiser.state_dict(), (ema if weights == "ema" else raw).state_dict())


def test_raw_weights_are_refused_from_a_single_set_export_file(tmp_path):
    cfg = _cfg(tmp_path, _save_export(_source(), tmp_path / "model.pt"), "train.init_weights=raw")
    with pytest.raises(ValueError, match="train.init_weights=raw: .* holds one set of weights"):
        plan_init(cfg, None)


def test_a_new_class_count_reinitialises_the_label_table_and_keeps_the_null_row(tmp_path, caplog):
    source = _source(num_classes=4)
    cfg = _cfg(tmp_path, _save_export(source, tmp_path / "model.pt"), "model.num_classes=6")
    _, notes = plan_init(cfg, None)
    assert any(LABEL_TABLE in note and "4 classes" in note and "6" in note for note in notes)
    fresh = build_objective_module(cfg).denoiser.state_dict()[LABEL_TABLE]
    with caplog.at_level(logging.WARNING, logger="dip.init_from"):
        module, _ = _init(cfg, tmp_path)
    assert any(LABEL_TABLE in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    loaded = module.denoiser.state_dict()
    table = loaded[LABEL_TABLE]
    assert table.shape == (7, 64)
    assert torch.equal(table[6], source.state_dict()[LABEL_TABLE][4])  # the trained null row, at the new null index
    assert torch.equal(table[:6], fresh[:6])                           # the class rows: the new model's own init
    _assert_equal_weights(loaded, source.state_dict(), skip=(LABEL_TABLE,))


def test_any_other_shape_difference_is_refused_naming_tensors_and_shapes(tmp_path):
    wide = _source(hidden_size=96, num_heads=2)  # DiP-T/16 is 64 wide
    cfg = _cfg(tmp_path, _save_export(wide, tmp_path / "wide.pt"))
    with pytest.raises(InitMismatch) as refused:
        plan_init(cfg, None)
    text = str(refused.value)
    assert "s_embedder.proj.weight: source (96, 768) vs model (64, 768)" in text
    assert "blocks.0.attn.qkv.weight" in text and "wide.pt" in text
    with pytest.raises(InitMismatch):  # the worker refuses too, and loads nothing
        _init(cfg, tmp_path)
    linear = _source(head="linear")  # the linear-head ablation: the Patch Detailer Head is missing
    with pytest.raises(InitMismatch, match=r"missing from the source \(\d+\): local_decoder\."):
        plan_init(_cfg(tmp_path, _save_export(linear, tmp_path / "linear.pt")), None)


def test_the_driver_refuses_before_ray_starts(tmp_path):
    import ray

    from cluster.driver.launch import launch

    assert not ray.is_initialized()
    cfg = _cfg(tmp_path, _save_export(_source(hidden_size=96, num_heads=2), tmp_path / "wide.pt"))
    with pytest.raises(InitMismatch, match="s_embedder.proj.weight"):
        launch(cfg, echo=lambda line: None)
    assert not ray.is_initialized()


def test_a_repa_projector_on_one_side_only_is_initialised_with_a_warning(tmp_path, caplog):
    cfg = _cfg(tmp_path, _save_export(_source(), tmp_path / "model.pt"), "objective.repa_encoder=tiny",
               "objective.repa_block=1")
    with caplog.at_level(logging.WARNING, logger="dip.init_from"):
        module, _ = _init(cfg, tmp_path)
    assert any("repa_projector" in r.getMessage() and "initialised fresh" in r.getMessage() for r in caplog.records)
    assert hasattr(module, "repa_projector")


def test_a_missing_source_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.init_from='.*nowhere'"):
        plan_init(_cfg(tmp_path, str(tmp_path / "nowhere")), None)


def test_a_run_with_checkpoints_of_its_own_ignores_init_from(tmp_path):
    _, notes = plan_init(_cfg(tmp_path, str(tmp_path / "nowhere")), "runs/warm/checkpoints/step-4")
    assert notes == ["train.init_from='" + str(tmp_path / "nowhere") + "' ignored: the run resumes from its own "
                     "checkpoint runs/warm/checkpoints/step-4 (init_from only starts a new run)"]


# ----------------------------------------------------------------------------------------------
#                      a 32 px model warm-starts a 64 px run: lower loss from the first steps
# ----------------------------------------------------------------------------------------------

def _losses(module, resolution: int, steps: int, lr: float = 1e-3) -> list[float]:
    """Plain-torch training on the synthetic classes (the same batches and draws for every caller)."""
    from data.records import to_pm1
    from data.synthetic import reference_images
    from trainer.loop.rng import keyed_draws

    images, labels = reference_images(64, resolution, num_classes=4, seed=0)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        index = [(step * 8 + i) % 64 for i in range(8)]
        keys = [f"img-{i}" for i in index]
        draws = keyed_draws(0, step, keys, (3, resolution, resolution), "cpu")
        loss, _ = module(to_pm1(images[index]).float(), labels[index], draws)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_a_32px_model_warm_starts_a_64px_run_with_a_lower_loss_than_from_scratch(tmp_path):
    low = tiny_config(tmp_path, "low", ["data.resolution=32", "model.init=variance_preserving"])
    trained = build_objective_module(low)
    _losses(trained, 32, steps=60)
    path = _save_export(trained.denoiser, tmp_path / "low.pt")
    high = ["data.resolution=64", "model.init=variance_preserving"]
    scratch = build_objective_module(tiny_config(tmp_path, "scratch", high))
    warm, _ = _init(_cfg(tmp_path, path, *high), tmp_path)
    scratch_losses, warm_losses = _losses(scratch, 64, steps=10), _losses(warm, 64, steps=10)
    # from the first step and on average over the first ten
    assert warm_losses[0] < scratch_losses[0]
    assert sum(warm_losses) / 10 < 0.9 * sum(scratch_losses) / 10, (warm_losses, scratch_losses)


def test_the_config_keys_are_checked_and_default_to_a_run_from_scratch():
    from trainer.config import config_from_dict

    cfg = config_from_dict({})
    assert (cfg.train.init_from, cfg.train.init_weights) == ("", "ema")
    with pytest.raises(ValueError, match=r"train.init_weights='bogus' is not valid: .*\['ema', 'raw'\]"):
        config_from_dict({}, ["train.init_weights=bogus"])
    with pytest.raises(ValueError, match="train.init_from"):
        config_from_dict({"train": {"init_from": ["a", "b"]}})
