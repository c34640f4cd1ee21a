"""`dip eval fid | ref-stats | run` end to end, and `dip eval fid` against an independent standard FID."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.cli.main import main
from tests.test_eval_support import photo_crops, save_tiny_checkpoint, tf1_resize_bilinear_reference

REPO = Path(__file__).resolve().parents[1]


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def independent_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Standard FID written separately: numpy TF1 resize (float64), (x - 128) / 128, the shipped
    TorchScript network in one call, np.cov, and tr sqrt via eigenvalues of sqrt(S1) S2 sqrt(S1)."""
    from trainer.eval.inception import load_fid_network

    network = load_fid_network()

    def features(images):
        resized = np.stack([tf1_resize_bilinear_reference(image, 299, 299) for image in images])  # (N, 299, 299, 3)
        x = torch.from_numpy(((resized - 128.0) / 128.0).astype(np.float32)).permute(0, 3, 1, 2)
        with torch.no_grad():
            return network(x).double().numpy()

    fa, fb = features(a), features(b)
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root @ s2 @ root)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


@pytest.mark.slow  # two 2048 x 2048 scipy.linalg.sqrtm calls: about a minute on a 2-core machine
def test_dip_eval_fid_agrees_with_an_independent_standard_fid(tmp_path, capsys):
    set_a = photo_crops(10, 120, seed=11, sources=[0, 1])   # china + flower
    set_b = photo_crops(10, 120, seed=12, sources=[2, 0])   # grace hopper + china
    folder_a = write_pngs(tmp_path / "a", set_a)
    np.savez(tmp_path / "b.npz", arr_0=set_b)               # an ADM-style batch on the other side
    assert main(["eval", "fid", str(folder_a), str(tmp_path / "b.npz"), "--device", "cpu", "--batch-size", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("FID ")
    assert any(line.startswith("IS n/a") for line in lines)  # said plainly, never a number
    assert any(line.startswith("sFID ") for line in lines)
    ours = float(lines[-1].split()[1])
    expected = independent_fid(set_a, set_b)
    assert ours > 1.0
    assert abs(ours - expected) <= 1e-4 * expected, (ours, expected)


def test_dip_eval_ref_stats_on_synthetic_data(tmp_path, capsys):
    from data.synthetic import reference_images

    from trainer.eval.inception import InceptionFeatures
    from trainer.eval.reference import ReferenceStats

    out = tmp_path / "ref.npz"
    code = main(["eval", "ref-stats", "--data", "synthetic", "--num-samples", "12", "--image-size", "32",
                 "--num-classes", "4", "--out", str(out), "--device", "cpu"])
    assert code == 0
    assert "12 images (0 unreadable, skipped)" in capsys.readouterr().out
    reference = ReferenceStats.load(out)
    images, labels = reference_images(12, 32, 4)
    assert np.bincount(labels.numpy()).tolist() == [3, 3, 3, 3]
    pool, spatial = InceptionFeatures()(images)
    np.testing.assert_allclose(reference.pool.mu, pool.double().mean(0).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(reference.spatial.mu, spatial.double().mean(0).numpy(), rtol=0, atol=1e-6)
    assert reference.num_images == 12 and reference.pool_features.shape == (12, 2048)


def test_bad_eval_input_is_one_clear_line(tmp_path, capsys):
    assert main(["eval", "ref-stats", "--data", "synthetic", "--out", str(tmp_path / "ref.txt")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["eval", "fid", str(tmp_path / "missing"), str(tmp_path / "also-missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err and "no such" in err
    assert main(["eval", "ref-stats", "--data", "synthetic", "--out", str(tmp_path / "r.npz")]) == 2
    assert "--image-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "run", "ckpt", "--ref", "r.npz", "--interval", "0.1"])  # argparse: LO,HI expected
    assert "LO,HI" in capsys.readouterr().err


def test_eval_run_checks_its_flags_against_the_checkpoint_before_starting_ray(tmp_path, capsys):
    import ray

    checkpoint = save_tiny_checkpoint(tmp_path / "run" / "step-5", num_classes=10, trained_at=32)
    ref = str(tmp_path / "ref.npz")
    run = lambda *flags: main(["eval", "run", str(checkpoint), "--ref", ref, *flags])  # noqa: E731
    assert run("--image-size", "40") == 2
    assert capsys.readouterr().err.strip() == ("dip eval: error: --image-size 40 is not a multiple of the model's "
                                               "patch size 16: use e.g. 32 or 48")
    assert run("--num-classes", "11") == 2
    assert "--num-classes 11: the checkpoint's model has 10 classes" in capsys.readouterr().err
    assert not ray.is_initialized()


@pytest.mark.slow  # starts its own Ray cluster in a subprocess
def test_dip_eval_run_writes_an_adm_batch_and_prints_fid_last(tmp_path):
    from data.synthetic import reference_images

    from trainer.eval.inception import InceptionFeatures
    from trainer.eval.reference import ReferenceStats

    images, _ = reference_images(16, 32, 10)
    pool, spatial = InceptionFeatures()(images)
    ReferenceStats.from_features(pool.numpy(), spatial.numpy()).save(tmp_path / "ref.npz")
    checkpoint = save_tiny_checkpoint(tmp_path / "run" / "step-5", trained_at=32)  # no --image-size: 32 from it
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "eval", "run", str(checkpoint), "--ref", str(tmp_path / "ref.npz"),
         "--num-samples", "8", "--steps", "2", "--cfg", "1.5", "--interval", "0.1,0.9",
         "--batch-size", "4", "--num-actors", "1", "--save-npz", str(tmp_path / "samples.npz"), "--fid-method", "eigh"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("FID ") and float(lines[-1].split()[1]) > 0
    assert any(line.startswith("IS n/a") for line in lines)
    with np.load(tmp_path / "samples.npz") as batch:
        assert batch["arr_0"].shape == (8, 32, 32, 3) and batch["arr_0"].dtype == np.uint8
