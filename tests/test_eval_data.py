"""Eval inputs and outputs: image sets (folders, streamed .npz), ADM sample batches, reference files,
class-balanced reference images (synthetic, ImageFolder with a corrupt file, real shards)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.test_eval_support import photo_crops
from trainer.eval.datasets import ClassQuota, DatasetRequest, ReadCounts, dataset_batches
from trainer.eval.images import ImageSet, NpzBatchWriter, iter_npz_rows
from trainer.eval.metrics import GaussianStats
from trainer.eval.reference import ReferenceStats, score


def write_folder(root, images, names=None):
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / (names[i] if names else f"{i:04d}.png"))
    return root


def test_image_folder_skips_and_counts_corrupt_files(tmp_path):
    crops = photo_crops(5, 40, seed=0)
    folder = write_folder(tmp_path / "imgs", crops)
    (folder / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # replaces a good one
    Image.fromarray(photo_crops(1, 24, seed=1)[0]).save(folder / "9999.png")  # a different size
    images = ImageSet(folder)
    batches = list(images.batches(batch_size=3))
    assert images.skipped == 1
    assert [b.shape for b in batches] == [(3, 40, 40, 3), (1, 40, 40, 3), (1, 24, 24, 3)]
    np.testing.assert_array_equal(batches[0][2], crops[3])  # order kept, the corrupt file left out


def test_image_set_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageSet(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageSet(tmp_path / "empty")
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(tmp_path / "bad.npz")


def test_npz_rows_stream_equal_the_whole_array(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(23, 8, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=images)
    blocks = list(iter_npz_rows(tmp_path / "a.npz", rows=5))
    assert [len(b) for b in blocks] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate(blocks), images)
    with pytest.raises(ValueError, match="holds"):
        list(iter_npz_rows(tmp_path / "a.npz", key="mu"))


def test_npz_batch_writer_makes_an_adm_sample_batch(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(10, 4, 4, 3), dtype=np.uint8)
    writer = NpzBatchWriter(tmp_path / "samples.npz", 10, 4, 4)
    writer.write(6, images[6:], np.arange(6, 10) % 3)  # out of order, as the pool's chunks arrive
    with pytest.raises(ValueError, match="never written"):
        NpzBatchWriter(tmp_path / "partial.npz", 10, 4, 4).close()
    writer.write(0, images[:6], np.arange(6) % 3)
    writer.close()
    with np.load(tmp_path / "samples.npz") as batch:
        assert batch["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(batch["arr_0"], images)
        np.testing.assert_array_equal(batch["arr_1"], np.arange(10) % 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # no temp files left


def test_reference_round_trip_and_adm_format(tmp_path):
    rng = np.random.default_rng(2)
    pool, spatial = rng.normal(size=(40, 16)), rng.normal(size=(40, 12))  # small: sqrtm of 2048^2 is slow
    reference = ReferenceStats.from_features(pool, spatial, keep_features=30)
    reference.save(tmp_path / "ref.npz")
    loaded = ReferenceStats.load(tmp_path / "ref.npz")
    np.testing.assert_array_equal(loaded.pool.sigma, reference.pool.sigma)
    np.testing.assert_array_equal(loaded.spatial.mu, reference.spatial.mu)
    assert loaded.pool_features.shape == (30, 16) and loaded.num_images == 40
    # The ADM suite's key names: mu / sigma / mu_s / sigma_s (no features: no precision/recall).
    np.savez(tmp_path / "adm.npz", mu=reference.pool.mu, sigma=reference.pool.sigma,
             mu_s=reference.spatial.mu, sigma_s=reference.spatial.sigma)
    adm = ReferenceStats.load(tmp_path / "adm.npz")
    scores = score(pool, spatial, adm)
    assert abs(scores.fid) < 1e-6 and abs(scores.sfid) < 1e-6
    assert scores.precision is None and scores.recall is None
    np.savez(tmp_path / "wrong.npz", mean=reference.pool.mu)
    with pytest.raises(ValueError, match=r"wrong\.npz.*'mu' and 'sigma'.*\['mean'\]"):
        ReferenceStats.load(tmp_path / "wrong.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        ReferenceStats.load(tmp_path / "missing.npz")


def test_adm_reference_batch_uses_arr_0_for_precision_recall(tmp_path):
    from trainer.eval.inception import InceptionFeatures, extract_features

    extractor = InceptionFeatures()
    crops = photo_crops(6, 32, seed=3)
    pool, spatial = extract_features(extractor, [crops])
    np.savez(tmp_path / "adm.npz", arr_0=crops, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False))
    loaded = ReferenceStats.load(tmp_path / "adm.npz", extractor=extractor)
    np.testing.assert_allclose(loaded.pool_features, pool, rtol=0, atol=1e-6)
    assert loaded.spatial is None


def test_class_quota_is_exact_and_even():
    quota = ClassQuota(7, 3)
    assert quota.left.tolist() == [3, 2, 2]
    for label in (0, 0, 0, 1, 1, 2, 2):
        assert quota.wants(label)
        quota.take(label)
    assert quota.done and not quota.wants(0)


def test_synthetic_reference_images_are_the_data_layers(tmp_path):
    from data.synthetic import reference_images

    counts = ReadCounts()
    request = DatasetRequest("synthetic", num_samples=12, image_size=16, num_classes=4, batch_size=5)
    got = np.concatenate(list(dataset_batches(request, counts)))
    expected, labels = reference_images(12, 16, 4)
    np.testing.assert_array_equal(got, expected.permute(0, 2, 3, 1).numpy())
    assert counts.images == 12 and np.bincount(labels.numpy()).tolist() == [3, 3, 3, 3]


def test_image_folder_tree_is_class_balanced_and_skips_corrupt(tmp_path):
    crops = photo_crops(12, 48, seed=4)
    root = tmp_path / "tree"
    write_folder(root / "a_class", crops[:5])
    write_folder(root / "b_class", crops[5:8])
    write_folder(root / "c_class", crops[8:12])
    (root / "a_class" / "0000.png").write_bytes(b"garbage")  # the first of class a is unreadable
    counts = ReadCounts()
    request = DatasetRequest(str(root), num_samples=6, image_size=32, batch_size=4)
    got = np.concatenate(list(dataset_batches(request, counts)))
    assert got.shape == (6, 32, 32, 3)
    assert counts.skipped == 1 and counts.images == 6
    from data.transforms import adm_center_crop
    expected = [crops[i] for i in (1, 2, 5, 6, 8, 9)]  # two per class, the corrupt one replaced by the next
    for image, original in zip(got, expected):
        np.testing.assert_array_equal(image, np.asarray(adm_center_crop(Image.fromarray(original), 32)))
    with pytest.raises(ValueError, match="not enough images"):
        list(dataset_batches(DatasetRequest(str(root), num_samples=15, image_size=32), ReadCounts()))


def test_real_shards_are_read_once_in_order(tmp_path):
    from data import prepare_dataset
    from data.config import DataConfig
    from data.synthetic import reference_images

    config = prepare_dataset(DataConfig(path="synthetic", resolution=16, synthetic_images=24, synthetic_classes=4),
                             str(tmp_path / "work"))
    counts = ReadCounts()
    got = np.concatenate(list(dataset_batches(DatasetRequest(config.path, image_size=16, batch_size=8), counts)))
    assert got.shape == (24, 16, 16, 3) and counts.images == 24
    expected, _ = reference_images(24, 16, 4)
    # Same set of images as the data layer's source (the shard order may differ from the index order).
    as_rows = {row.tobytes() for row in expected.permute(0, 2, 3, 1).numpy()}
    assert {row.tobytes() for row in got} == as_rows
    request = DatasetRequest(config.path, num_samples=8, image_size=16)
    balanced = np.concatenate(list(dataset_batches(request, ReadCounts())))
    assert balanced.shape == (8, 16, 16, 3)


def test_scores_report_unavailable_metrics_as_none_not_numbers():
    rng = np.random.default_rng(5)
    pool = rng.normal(size=(10, 8))
    reference = ReferenceStats(pool=GaussianStats.of(pool))
    scores = score(pool, None, reference)
    assert scores.sfid is None and scores.precision is None
    assert "sFID n/a" in str(scores)
