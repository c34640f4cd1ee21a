"""Pure-logic tests of the data layer: config validation, ADM crop, pixels, synthetic set, wds plans."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data.config import DataConfig
from data.records import flip_decision
from data.synthetic import class_names, label_for, make_image, reference_images
from data.transforms import CorruptImageError, adm_center_crop, decode_image, to_tensor_pm1
from data.wds_plan import EpochStream, Phase, PhaseLayout, current_layout, merge, round_robin, subtract, take
from data.writer import parse_size


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field,value,needle", [
    ("format", "tfrecord", "['mds', 'wds']"),
    ("resolution", 0, "resolution"),
    ("batch_size", 0, "batch_size"),
    ("num_workers", -1, "num_workers"),
    ("path", "ftp://host/x", "unsupported URI scheme"),
    ("hflip", "yes", "hflip"),
])
def test_config_rejects_bad_values_naming_the_field(field, value, needle):
    with pytest.raises(ValueError) as info:
        DataConfig(**{field: value})
    assert needle in str(info.value) and repr(value) in str(info.value)


def test_config_accepts_remote_uris_and_synthetic():
    assert DataConfig(path="s3://bucket/prefix").path == "s3://bucket/prefix"
    assert DataConfig(path="synthetic").is_synthetic
    assert DataConfig(num_workers=0).num_workers == 0


# -------------------------------------------------------------------------------------------- pixels
def reference_center_crop_arr(pil_image, image_size):
    """guided-diffusion's center_crop_arr, verbatim in behaviour (the spec's ADM crop)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.parametrize("size,target", [((300, 217), 64), ((217, 300), 100), ((64, 64), 64), ((50, 90), 64)])
def test_adm_center_crop_matches_reference(size, target):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    ours = np.asarray(adm_center_crop(image, target))
    assert ours.shape == (target, target, 3)
    np.testing.assert_array_equal(ours, reference_center_crop_arr(image, target))


def test_to_tensor_pm1_scales_and_flips():
    array = np.zeros((2, 3, 3), np.uint8)
    array[:, 0] = 255  # left column white
    tensor = to_tensor_pm1(Image.fromarray(array, "RGB"))
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor[:, :, 0].eq(1).all() and tensor[:, :, 1:].eq(-1).all()
    flipped = to_tensor_pm1(Image.fromarray(array, "RGB"), hflip=True)
    assert flipped[:, :, 2].eq(1).all() and flipped[:, :, :2].eq(-1).all()


def test_decode_rejects_truncated_and_garbage():
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    assert decode_image(data).size == (64, 64)
    for bad in (data[: len(data) // 2], b"not an image", b""):
        with pytest.raises(CorruptImageError):
            decode_image(bad)


def test_flip_is_a_fair_function_of_seed_epoch_key():
    keys = [f"k{i}" for i in range(2000)]
    flips = [flip_decision(0, 0, k) for k in keys]
    assert flips == [flip_decision(0, 0, k) for k in keys]
    assert 0.45 < np.mean(flips) < 0.55
    assert flips != [flip_decision(0, 1, k) for k in keys]


def test_parse_size():
    assert parse_size("256MB") == 256 << 20 and parse_size("1GB") == 1 << 30 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="shard-size"):
        parse_size("lots")


# ----------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_seeded():
    a = np.asarray(make_image(7, 3, 32, seed=0))
    assert a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, np.asarray(make_image(7, 3, 32, seed=0)))
    assert not np.array_equal(a, np.asarray(make_image(7, 3, 32, seed=1)))
    assert not np.array_equal(a, np.asarray(make_image(8, 3, 32, seed=0)))


def test_synthetic_classes_are_learnable_at_32px():
    """A linear classifier on joint colour histograms of 32x32 images, trained 300 steps, must be far above
    chance (10%) on held-out images: the classes differ in colour and shape, not just in noise."""
    images, labels = reference_images(600, 32, num_classes=10, seed=0)
    levels = images.long() // 64  # (600, 3, 32, 32), 4 levels per channel
    bins = levels[:, 0] * 16 + levels[:, 1] * 4 + levels[:, 2]  # (600, 32, 32)
    hist = torch.stack([torch.bincount(b.flatten(), minlength=64) for b in bins]).float() / 102.4  # (600, 64)
    train, test = slice(0, 450), slice(450, 600)
    torch.manual_seed(0)
    classifier = torch.nn.Linear(64, 10)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=0.05)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(classifier(hist[train]), labels[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (classifier(hist[test]).argmax(1) == labels[test]).float().mean().item()
    assert accuracy > 0.85, accuracy
    assert images.float().flatten(1).std(0).mean() > 20  # images vary: placement, scale, shade


def test_synthetic_labels_and_names():
    assert [label_for(i, 10) for i in range(12)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    names = class_names(12)
    assert len(set(names)) == 12 and names == sorted(names)
    with pytest.raises(ValueError):
        make_image(0, 0, 4)


# ------------------------------------------------------------------------------------- webdataset plans
def test_interval_helpers():
    assert take([(0, 10)], 5, 25) == [(5, 10), (0, 10), (0, 5)]  # wraps round for padding
    assert take([(0, 3), (10, 13)], 2, 5) == [(2, 3), (10, 12)]
    assert subtract([(0, 10), (20, 30)], [(5, 22)]) == [(0, 5), (22, 30)]
    assert merge([(5, 6), (0, 5), (8, 9)]) == [(0, 6), (8, 9)]


def positions(intervals):
    return [p for a, b in intervals for p in range(a, b)]


@pytest.mark.parametrize("n,world,workers,batch", [(100, 2, 3, 4), (97, 3, 2, 5), (64, 1, 0, 8), (10, 4, 1, 2)])
def test_phase_layout_deals_each_position_once(n, world, workers, batch):
    layout = PhaseLayout([(0, n)], Phase(world, workers, batch))
    seen = [p for r in range(world) for s in range(max(1, workers)) for p in positions(layout.slot_intervals(r, s))]
    per_rank = -(-n // world)
    assert len(seen) == world * (per_rank // batch) * batch  # whole batches only
    assert len(set(seen)) == len(seen) or world * per_rank > n  # duplicates only from wrap-round padding
    if world * per_rank == n and per_rank % batch == 0:
        assert sorted(seen) == list(range(n))


def test_round_robin_is_dataloader_order():
    assert round_robin([2, 3]) == [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2)]


@pytest.mark.parametrize("batches_before", [0, 1, 3, 5])
def test_elastic_phase_change_reads_every_sample_exactly_once(batches_before):
    n = 96
    first = Phase(world_size=2, num_workers=2, batch_size=4, batches=batches_before)
    layout1 = PhaseLayout([(0, n)], first)
    before = positions(layout1.consumed(batches_before))
    assert len(before) == 2 * 4 * batches_before
    layout2 = current_layout(n, [first, Phase(world_size=3, num_workers=1, batch_size=4)])
    after = [p for r in range(3) for p in positions(layout2.slot_intervals(r, 0))]
    remaining = n - len(before)
    assert not set(before) & set(after)
    # the new phase reads all the rest, up to its whole-batch tail and wrap-round padding
    assert len(set(after)) >= remaining - 3 * 4
    assert set(before) | set(after) <= set(range(n))


def test_epoch_stream_is_a_seeded_permutation_of_records():
    stream = EpochStream([5, 3, 4], seed=1, epoch=0, shuffle=True)
    records = [(s, r) for s, rs in stream.segments([(0, 12)]) for r in rs]
    assert sorted(records) == sorted((s, r) for s, n in enumerate([5, 3, 4]) for r in range(n))
    again = [(s, r) for s, rs in EpochStream([5, 3, 4], 1, 0, True).segments([(0, 12)]) for r in rs]
    other_epoch = [(s, r) for s, rs in EpochStream([5, 3, 4], 1, 1, True).segments([(0, 12)]) for r in rs]
    assert records == again and records != other_epoch
    plain = [(s, r) for s, rs in EpochStream([2, 2], 0, 0, False).segments([(1, 3)]) for r in rs]
    assert plain == [(0, 1), (1, 0)]


def _chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels))


def test_npy_records_roundtrip_without_a_codec():
    from data.records import decode_record, to_pm1
    from data.transforms import encode_image

    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB")
    data, ext = encode_image(image, "npy")
    assert ext == "npy"
    torch.testing.assert_close(to_pm1(_chw(decode_record(data, "k", 16, hflip=False, seed=0, epoch=0))),
                               to_tensor_pm1(image))
    flipped = [k for k in "abcdefgh" if flip_decision(0, 0, k)][0]
    torch.testing.assert_close(to_pm1(_chw(decode_record(data, flipped, 16, hflip=True, seed=0, epoch=0))),
                               to_tensor_pm1(image, hflip=True))
    # stored larger than asked: goes through the ADM crop like any image
    torch.testing.assert_close(to_pm1(_chw(decode_record(data, "k", 8, hflip=False, seed=0, epoch=0))),
                               to_tensor_pm1(adm_center_crop(image, 8)))
    with pytest.raises(CorruptImageError):
        decode_record(data[:40], "k", 16, hflip=False, seed=0, epoch=0)
    with pytest.raises(CorruptImageError):  # a known header (cached above), its pixels cut short
        decode_record(data[:-5], "k", 16, hflip=False, seed=0, epoch=0)
    # shards written before the (3, H, W) layout hold (H, W, 3) arrays: they read the same
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(image), allow_pickle=False)
    torch.testing.assert_close(to_pm1(_chw(decode_record(buffer.getvalue(), "k", 16, hflip=False, seed=0, epoch=0))),
                               to_tensor_pm1(image))
