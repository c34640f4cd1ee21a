"""trainer/checkpoint/pins.py: features built on library internals refuse an untested release (or take
their documented safe path). The installed version is faked (pure logic); the features are the real ones."""
import pytest

from trainer.checkpoint import pins


def _installed(monkeypatch, **versions):
    real = pins.installed_version
    monkeypatch.setattr(pins, "installed_version", lambda package: versions.get(package.replace("-", "_"),
                                                                                  real(package)))


def test_the_tested_versions_are_the_installed_ones():
    """The pins say what this environment runs (re-test and move a pin when the stack is upgraded)."""
    assert {feature: pins.mismatch(feature) for feature in pins.PINS} == {feature: None for feature in pins.PINS}


def test_a_patch_release_of_the_tested_series_is_accepted_and_another_minor_refused(monkeypatch):
    _installed(monkeypatch, deepspeed="0.19.9")
    pins.require("non-finite step skip")
    for version in ("0.20.0", "0.19.7", "1.19.8"):
        _installed(monkeypatch, deepspeed=version)
        with pytest.raises(RuntimeError) as refused:
            pins.require("non-finite step skip")
        message = str(refused.value)
        assert message.startswith("non-finite step skip uses deepspeed internals")
        assert "tested with deepspeed==0.19.8" in message and f"installed: deepspeed=={version}" in message
    _installed(monkeypatch, deepspeed=None)
    with pytest.raises(RuntimeError, match="installed: deepspeed==none"):
        pins.require("ZeRO checkpoint re-partitioning")


def test_deepspeed_features_refuse_to_start_with_an_untested_deepspeed(monkeypatch, tmp_path):
    from trainer.checkpoint.deepspeed_io import deepspeed_safe_globals
    from trainer.checkpoint.repartition import ZeroCheckpoint
    from trainer.loop.nonfinite import guard_plain_optimizer
    from trainer.loop.training_ema import ShardedEMA

    _installed(monkeypatch, deepspeed="0.21.0")
    with pytest.raises(RuntimeError, match=r"^ZeRO checkpoint re-partitioning uses deepspeed .*0\.19\.8"):
        ZeroCheckpoint(str(tmp_path))
    with pytest.raises(RuntimeError, match=r"^sharded EMA uses deepspeed .*0\.19\.8"):
        ShardedEMA(None, 0.999, 0, 2)
    with pytest.raises(RuntimeError, match=r"^non-finite step skip uses deepspeed .*0\.19\.8"):
        guard_plain_optimizer(None)
    with pytest.raises(RuntimeError, match=r"^DeepSpeed checkpoint loading uses deepspeed .*0\.19\.8"):
        deepspeed_safe_globals()


def test_the_grow_checkpoint_falls_back_to_rays_own_policy_with_an_untested_ray(monkeypatch, caplog):
    from ray.train import ScalingConfig

    from cluster.driver.elastic import checkpoint_before_grow_policy

    scaling = ScalingConfig(num_workers=(1, 2))
    assert type(checkpoint_before_grow_policy(scaling, "/nowhere", timeout_s=1)).__name__ == "CheckpointBeforeGrow"
    _installed(monkeypatch, ray="2.61.0")
    with caplog.at_level("WARNING", logger="dip.elastic"):
        assert checkpoint_before_grow_policy(scaling, "/nowhere", timeout_s=1) is None
    assert "tested with ray==2.60.0; installed: ray==2.61.0" in caplog.text
    assert "a grow restarts from the last periodic checkpoint" in caplog.text


def test_mlflow_tracking_uri_takes_the_public_api_with_an_untested_mlflow(monkeypatch, tmp_path):
    import mlflow

    from trainer.tracking.logged_model import _tracking_uri

    before = mlflow.get_tracking_uri()
    target = f"sqlite:///{tmp_path}/mlflow.db"
    _installed(monkeypatch, mlflow_skinny="3.18.0")
    with _tracking_uri(target):
        assert mlflow.get_tracking_uri() == target
    assert mlflow.get_tracking_uri() == before
