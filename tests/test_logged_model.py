"""The final EMA model as an MLflow LoggedModel (trainer/tracking/logged_model.py) on a real sqlite store, without
Ray: the referenced form, the auto choice, what a pruned checkpoint says. The copied form, registration
and the real run are read back in tests/test_trainer_e2e.py."""
import os

import pytest
import torch

pytestmark = pytest.mark.slow  # an MLflow store, model logging and loading: ~10-20 s on the 2-core machine

LABELS = [0, 1, 2, 4]


def _checkpoint(root) -> str:
    """A checkpoint root with step-8/ema.pt of a tiny DiP, in the layout the trainer writes."""
    from models.registry import create_model
    from trainer.checkpoint.manager import ema_file_payload

    torch.manual_seed(0)
    model = create_model("DiP-T/16", num_classes=4)
    os.makedirs(root / "ckpt" / "step-8")
    torch.save(ema_file_payload(model.config, model.state_dict()), root / "ckpt" / "step-8" / "ema.pt")
    return str(root / "ckpt")


def test_a_referenced_model_is_a_pointer_that_loads_the_checkpoint_weights(tmp_path, mlflow_reads_from, caplog):
    import mlflow
    from mlflow.tracking import MlflowClient

    from trainer.config import config_from_dict
    from trainer.tracking.logged_model import log_ema_model, log_final_model, weights_mode
    from trainer.model_io import load_sampling_model
    from trainer.sampling import sample_pixels
    from trainer.tracking.run_logger import embedded_uri, open_run

    checkpoints = _checkpoint(tmp_path)
    uri = embedded_uri(str(tmp_path))
    run_id = open_run(uri, "dip-test", "r.1", {}, {}, str(tmp_path / "artifacts"))
    # ema.pt is 25 MB: "auto" with a 1 MB ceiling references it instead of copying
    logged = log_ema_model(uri, run_id, "r.1", checkpoints, 8, "cafe0123", 16, weights="auto", copy_max_mb=1.0)
    assert logged.weights == "reference" and logged.registered_version is None
    assert os.environ.get("MLFLOW_TRACKING_URI") is None  # the process-wide URI was only borrowed

    client = MlflowClient(tracking_uri=uri)
    model = client.get_logged_model(logged.model_id)
    assert model.source_run_id == run_id and model.name == "r-1-ema" and model.status.to_proto() == 2  # READY
    assert model.tags["dip.checkpoint"] == os.path.join(checkpoints, "step-8")
    assert model.tags["dip.config_hash"] == "cafe0123" and model.tags["dip.weights"] == "reference"
    assert model.params["hidden_size"] == "64" and model.params["resolution"] == "16"
    stored = mlflow.artifacts.download_artifacts(f"{model.artifact_location}/data/model.pth",
                                                 dst_path=str(tmp_path / "download"))
    assert os.path.getsize(stored) < 10_000  # a pointer, not 25 MB of weights

    mlflow_reads_from(uri)
    loaded = mlflow.pytorch.load_model(logged.model_uri)
    expected = sample_pixels(load_sampling_model(os.path.join(checkpoints, "step-8")), LABELS, 16, steps=2)
    assert torch.equal(sample_pixels(loaded, LABELS, 16, steps=2), expected)  # what dip sample draws

    os.remove(os.path.join(checkpoints, "step-8", "ema.pt"))  # pruned by checkpoint.keep, say
    with pytest.raises(FileNotFoundError, match=r"references .*step-8/ema.pt, which is gone"):
        mlflow.pytorch.load_model(logged.model_uri)

    # the driver's wrapper: off by its switch, and a failure (here: no ema.pt) only warns
    cfg = config_from_dict({"run_name": "r1"})
    switched_off = config_from_dict({"tracking": {"log_model": False}})
    assert log_final_model(switched_off, uri, run_id, checkpoints, 8, "h") is None
    with caplog.at_level("WARNING", logger="dip.tracking"):
        assert log_final_model(cfg, uri, run_id, checkpoints, 8, "h") is None
    assert "the final EMA model was not logged to MLflow" in caplog.text
    assert weights_mode("auto", 10.0, 1024.0) == "copy" and weights_mode("copy", 5000.0, 1.0) == "copy"
