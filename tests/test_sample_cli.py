"""`dip sample` and checkpoint loading for sampling, through the real CLI."""
import dataclasses
import subprocess
import sys

import pytest
import torch
from PIL import Image

from cluster.cli.main import main
from models import DiP, export_official_state_dict
from models.registry import dip_config
from tests.test_eval_support import commit_step_dir, save_tiny_checkpoint
from trainer.model_io import infer_config, load_sampling_model


@pytest.mark.parametrize("name", ["DiP-T/16", "DiP-T/16-linear"])
def test_infer_config_from_shapes(name):
    cfg = dip_config(name, num_classes=7, patch_size=32)
    assert infer_config(DiP(cfg).state_dict()) == cfg


def test_loads_authors_layout_and_our_export_identically(tmp_path):
    torch.manual_seed(0)
    model, ema = DiP(dip_config("DiP-T/16", num_classes=7)), DiP(dip_config("DiP-T/16", num_classes=7))
    official, ours = tmp_path / "official.ckpt", tmp_path / "model.pt"
    torch.save(export_official_state_dict(model, ema), official)
    torch.save({"model_config": dataclasses.asdict(ema.config), "state_dict": ema.state_dict()}, ours)
    a, b = load_sampling_model(str(official)), load_sampling_model(str(ours))
    assert not a.training and a.config == b.config == ema.config
    x, t, y = torch.randn(1, 3, 32, 32), torch.rand(1), torch.tensor([7])
    assert torch.equal(a(x, t, y), ema(x, t, y)) and torch.equal(b(x, t, y), ema(x, t, y))


def test_sample_cli_writes_a_grid(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    model = DiP(dip_config("DiP-T/16", num_classes=4))
    torch.save({"model_config": dataclasses.asdict(model.config), "state_dict": model.state_dict()}, ckpt)
    out = tmp_path / "grid.png"
    rc = main(["sample", "--checkpoint", str(ckpt), "--labels", "0,1,2,4", "--steps", "2", "--method", "heun",
               "--cfg", "2.0", "--interval", "0.1,0.9", "--resolution", "32", "--out", str(out)])
    assert rc == 0
    image = Image.open(out)
    assert image.size == (64, 64) and len(set(image.getdata())) > 10  # 2 x 2 grid of 32 px samples


def test_sample_cli_reports_bad_input_in_one_line(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "cluster.cli", "sample", *a],  # noqa: E731
                                    capture_output=True, text=True)
    missing = run("--checkpoint", str(tmp_path / "none.ckpt"))
    assert missing.returncode == 2 and "no checkpoint at" in missing.stderr
    assert "Traceback" not in missing.stderr
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    junk = run("--checkpoint", str(tmp_path / "junk.ckpt"))
    assert junk.returncode == 2 and "cannot read checkpoint" in junk.stderr and "Traceback" not in junk.stderr
    bad_label = run("--init-model", "DiP-T/16", "--num-classes", "3", "--labels", "9", "--resolution", "16")
    assert bad_label.returncode == 2 and "outside 0..3" in bad_label.stderr


def test_checkpoint_root_resolves_to_the_newest_committed_step(tmp_path):
    torch.manual_seed(0)
    model = DiP(dip_config("DiP-T/16", num_classes=4))
    for step, committed in ((100, True), (200, True), (300, False)):  # step-300: an interrupted write
        step_dir = tmp_path / f"step-{step}"
        step_dir.mkdir()
        torch.save({"model_config": dataclasses.asdict(model.config),
                    "state_dict": {k: v + step for k, v in model.state_dict().items()}}, step_dir / "ema.pt")
        if committed:
            commit_step_dir(step_dir)
    loaded = load_sampling_model(str(tmp_path))
    key = "s_embedder.proj.bias"
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key] + 200)


def test_sample_defaults_to_what_the_checkpoint_records_and_a_flag_wins(tmp_path, capsys):
    """A 32-px run was sampled at 256 px (16 patches): the resolution and the labels now come from the
    checkpoint; --resolution still wins, and one the model cannot take is refused before anything runs."""
    commit_step_dir(save_tiny_checkpoint(tmp_path / "checkpoints" / "step-5", num_classes=3, trained_at=32))
    out = tmp_path / "grid.png"
    sample = lambda *flags: main(["sample", "--checkpoint", str(tmp_path / "checkpoints"), "--steps", "1",  # noqa: E731
                                  "--out", str(out), *flags])
    assert sample() == 0
    assert Image.open(out).size == (64, 64)  # labels 0,1,2 (all 3 classes): a 2 x 2 grid of 32 px tiles
    assert "3 samples, 32x32 (the resolution its run trained at)" in capsys.readouterr().out
    assert sample("--resolution", "48") == 0 and Image.open(out).size == (96, 96)
    capsys.readouterr()
    out.unlink()
    assert sample("--resolution", "40") == 2 and not out.exists()
    assert capsys.readouterr().err.strip() == ("dip sample: error: --resolution 40 is not a multiple of the model's "
                                               "patch size 16: use e.g. 32 or 48")
    assert sample("--num-classes", "10") == 2 and not out.exists()
    assert "the checkpoint's model has 3 classes" in capsys.readouterr().err


def test_checkpoint_facts_of_every_format(tmp_path):
    from trainer.model_io import TRAINED_WITH, checkpoint_facts

    torch.manual_seed(0)
    model, ema = DiP(dip_config("DiP-T/16", num_classes=7)), DiP(dip_config("DiP-T/16", num_classes=7))
    exported = {"model_config": dataclasses.asdict(ema.config), "state_dict": ema.state_dict()}
    torch.save({**exported, TRAINED_WITH: {"resolution": 48}}, tmp_path / "export.pt")
    torch.save(exported, tmp_path / "old-export.pt")
    torch.save(export_official_state_dict(model, ema), tmp_path / "authors.ckpt")
    facts = {name: checkpoint_facts(str(tmp_path / name)) for name in ("export.pt", "old-export.pt", "authors.ckpt")}
    assert {name: f.resolution for name, f in facts.items()} == {"export.pt": 48, "old-export.pt": None,
                                                                  "authors.ckpt": None}
    assert all(f.config == ema.config for f in facts.values())
    assert facts["export.pt"].image_side(None, "--resolution")[0] == 48
    assert facts["authors.ckpt"].image_side(None, "--resolution")[0] == 256  # nothing recorded: 16 patches a side
    assert facts["authors.ckpt"].check_num_classes(5, "--num-classes") == 5  # fewer classes may be evaluated
    with pytest.raises(ValueError, match="--num-classes 8: the checkpoint's model has 7 classes"):
        facts["authors.ckpt"].check_num_classes(8, "--num-classes")


@pytest.mark.slow  # the session's ZeRO-2 reference run (shared with the trainer fault tests)
def test_a_real_run_samples_and_exports_at_its_training_resolution(zero2_reference, tmp_path, capsys):
    from trainer.model_io import TRAINED_WITH

    checkpoints = zero2_reference.checkpoint_dir  # tests.test_trainer_support.TINY: 16 px, 1 patch a side
    out, exported = tmp_path / "grid.png", tmp_path / "model.pt"
    assert main(["sample", "--checkpoint", checkpoints, "--labels", "0,1", "--steps", "1", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 16)  # two 16 px tiles (512 x 256 before)
    assert main(["export", checkpoints, "--out", str(exported)]) == 0
    assert torch.load(exported, weights_only=True)[TRAINED_WITH] == {"resolution": 16}
    out.unlink()
    assert main(["sample", "--checkpoint", str(exported), "--labels", "0,1", "--steps", "1", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 16)
