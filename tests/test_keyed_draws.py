"""trainer.loop.rng.keyed_draws: per-sample t / noise / label-dropout draws keyed to (seed, step, sample).

The quickstart's grid scored lower after these draws replaced the per-rank generator; these tests pin
down that the draws themselves are not the cause: over many samples they have the statistics the
per-batch generator had (N(0, 1) for t's normal and the noise, U[0, 1) for the dropout coin, no
dependence between a sample's draws or between samples), and they do not depend on the batch's split.
"""
import numpy as np
import torch

from models.transport import FlowMatching
from trainer.loop.rng import keyed_draws, sample_seed

SHAPE = (3, 8, 8)


def _keys(count):
    return [f"{i % 10}/{i:06d}.png" for i in range(count)]  # the synthetic set's key form


def test_a_sample_draws_the_same_in_any_split_and_other_draws_at_another_step():
    keys = _keys(7)
    whole = keyed_draws(3, 5, keys, SHAPE, "cpu")
    parts = [keyed_draws(3, 5, keys[:2], SHAPE, "cpu"), keyed_draws(3, 5, keys[2:], SHAPE, "cpu")]
    for field in ("normal_t", "uniform_drop", "noise"):
        joined = torch.cat([getattr(p, field) for p in parts])
        torch.testing.assert_close(joined, getattr(whole, field), rtol=0, atol=0)
    assert not torch.equal(keyed_draws(3, 6, keys, SHAPE, "cpu").noise, whole.noise)
    assert not torch.equal(keyed_draws(4, 5, keys, SHAPE, "cpu").noise, whole.noise)


def test_draws_have_the_per_batch_generators_statistics():
    count = 3000
    draws = keyed_draws(0, 11, _keys(count), SHAPE, "cpu")
    normal, uniform = draws.normal_t.numpy(), draws.uniform_drop.numpy()
    noise = draws.noise.reshape(count, -1).numpy()
    # 3000 samples: the standard errors are ~0.018 (means) and ~0.013 (stds); bounds at ~5 of them
    assert abs(normal.mean()) < 0.09 and abs(normal.std() - 1) < 0.07
    assert abs(uniform.mean() - 0.5) < 0.03 and abs(uniform.std() - 12 ** -0.5) < 0.03
    assert abs((uniform < 0.1).mean() - 0.1) < 0.03  # label_dropout 0.1
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01
    # no dependence between a sample's t, its dropout coin and its noise, nor between samples' noise
    first = noise[:, 0]
    for a, b in ((normal, uniform), (normal, first), (uniform, first), (first[:-1], first[1:]),
                 (normal, noise[:, 1]), (noise[:, 0], noise[:, 8])):
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.1
    # t = sigmoid(n): the logit-normal schedule's median 0.5 and quartiles sigmoid(+-0.674)
    t = FlowMatching(num_classes=10).t_from_normal(draws.normal_t).numpy()
    assert np.allclose(np.quantile(t, [0.25, 0.5, 0.75]), [0.338, 0.5, 0.662], atol=0.03)


def test_a_samples_draws_at_two_steps_are_unrelated_and_a_quickstarts_seeds_all_differ():
    """The same sample at consecutive steps (the same key, the next step) gets independent noise and t,
    and the 600 x 16 draws of a quickstart all have their own seed in the 32 bits torch's generator keeps."""
    keys = _keys(64)
    steps = [keyed_draws(0, step, keys, (3, 32, 32), "cpu") for step in range(12)]
    noise = torch.stack([d.noise.flatten(1) for d in steps])             # (steps, keys, 3072)
    same_key_next_step = (noise[1:] * noise[:-1]).mean(-1)                  # per-key correlation
    assert abs(float(same_key_next_step.mean())) < 0.003                    # iid: mean 0, std 1/sqrt(3072)
    assert 0.015 < float(same_key_next_step.std()) < 0.021
    t = torch.stack([d.normal_t for d in steps])
    assert abs(np.corrcoef(t[1:].flatten(), t[:-1].flatten())[0, 1]) < 0.1  # 704 pairs: 0.1 is ~2.6 sd

    generator = torch.Generator()
    first = torch.randn(4, generator=generator.manual_seed(12345))
    assert torch.equal(first, torch.randn(4, generator=generator.manual_seed(12345 + (1 << 40)))), \
        "torch's CPU generator now keeps more than 32 bits of a seed: update sample_seed's docstring"
    rng = np.random.default_rng(0)
    seeds = {sample_seed(0, step, key) & 0xFFFFFFFF for step in range(600)
             for key in (f"{i % 10}/{i:06d}.png" for i in rng.choice(2000, 16, replace=False))}
    assert len(seeds) == 600 * 16
