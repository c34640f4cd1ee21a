"""SamplingSpec validation and the split-independent sample identity (noise and label per index)."""
from __future__ import annotations

import pytest
import torch

from trainer.eval.generation import class_labels, sample_noise, sample_seed
from trainer.eval.spec import SamplingSpec


def test_noise_depends_on_the_index_only_not_on_the_split():
    whole = sample_noise(seed=3, start=0, stop=10, channels=3, size=8)
    parts = torch.cat([sample_noise(3, 0, 4, 3, 8), sample_noise(3, 4, 7, 3, 8), sample_noise(3, 7, 10, 3, 8)])
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)
    assert not torch.equal(sample_noise(4, 0, 10, 3, 8), whole)  # another seed, other samples
    assert len({sample_seed(0, i) for i in range(1000)}) == 1000


def test_labels_are_class_balanced_round_robin():
    labels = class_labels(0, 50, 10)
    assert torch.bincount(labels).tolist() == [5] * 10
    torch.testing.assert_close(class_labels(23, 27, 10), torch.tensor([3, 4, 5, 6]))


def test_chunks_are_fixed_batches():
    assert SamplingSpec(num_samples=10, batch_size=4).chunks() == [(0, 4), (4, 8), (8, 10)]


@pytest.mark.parametrize("field,value,message", [
    ("method", "ddim", "euler"), ("steps", 0, ">= 1"), ("num_samples", 1, ">= 2"),
    ("cfg_interval", (0.9, 0.1), "lo <= hi"), ("timeshift", 0.0, "> 0"), ("cfg_scale", -1.0, ">= 0"),
    ("num_classes", 0, "positive"), ("seed", -1, "non-negative"),
])
def test_bad_specs_name_the_field_and_the_valid_values(field, value, message):
    with pytest.raises(ValueError, match=f"SamplingSpec.{field}.*{message}"):
        SamplingSpec(**{field: value})
