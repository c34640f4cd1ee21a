"""The DiP network, its registry, the official checkpoint layout, and the objective."""
import dataclasses

import pytest
import torch

from models import DiP, DiPConfig, export_official_state_dict, load_official_state_dict
from models.dip import apply_rope, rope_2d_frequencies
from models.ema import EMA
from models.registry import DIP_SIZES, create_model, dip_config
from models.repa import REPA, DINOv2Encoder, TinyEncoder, load_repa_encoder
from models.transport import FlowMatching


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _tiny(**overrides):
    torch.manual_seed(0)
    return DiP(dip_config("DiP-T/16", num_classes=10, **overrides))


# ------------------------------------------------------------------------------------ sizes


def test_xl16_parameter_count_matches_the_release():
    with torch.device("meta"):
        model = create_model("DiP-XL/16")
    assert _count(model) == 631_989_411
    assert _count(model.local_decoder) == 6_968_067


def test_xl32_parameter_count_matches_the_spec():
    with torch.device("meta"):
        model = create_model("DiP-XL/32")
    assert _count(model) == 634_643_619
    assert _count(model.local_decoder) == 6_968_067


def test_registry_has_every_size_and_linear_variant():
    for name in ("DiP-S/16", "DiP-B/16", "DiP-L/16", "DiP-XL/16", "DiP-XL/32", "DiP-XL/64"):
        assert name in DIP_SIZES and f"{name}-linear" in DIP_SIZES
        assert DIP_SIZES[f"{name}-linear"]["head"] == "linear"
    assert dip_config("DiP-B/16").hidden_size == 768 and dip_config("DiP-L/16").depth == 24
    with pytest.raises(ValueError, match="DiP-XL/16"):
        dip_config("DiP-XXL/16")


def test_official_state_dict_key_shapes():
    with torch.device("meta"):
        state = create_model("DiP-XL/16").state_dict()
    assert state["s_embedder.proj.weight"].shape == (1152, 768)
    assert state["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert state["blocks.0.attn.qkv.weight"].shape == (3456, 1152)
    assert "blocks.0.attn.qkv.bias" not in state
    assert state["blocks.3.attn.q_norm.weight"].shape == (72,)
    assert state["blocks.25.mlp.w2.weight"].shape == (1152, 3072)
    assert state["blocks.0.adaLN_modulation.0.weight"].shape == (6912, 1152)
    assert state["local_decoder.bottleneck.0.weight"].shape == (512, 512 + 1152, 1, 1)
    assert state["local_decoder.up4.weight"].shape == (512, 512, 2, 2)
    assert state["local_decoder.dec1.0.weight"].shape == (64, 128, 3, 3)
    assert state["local_decoder.out_conv.weight"].shape == (3, 64, 1, 1)


@pytest.mark.parametrize("field,value,choices", [
    ("head", "conv", "detailer"), ("patch_size", 8, "16, 32, 64"), ("init", "he", "variance_preserving"),
])
def test_config_rejects_bad_values_naming_field_and_choices(field, value, choices):
    with pytest.raises(ValueError, match=field) as info:
        DiPConfig(**{field: value})
    assert choices in str(info.value)


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="num_heads"):
        DiPConfig(hidden_size=100, num_heads=3)


# ------------------------------------------------------------------------------------ init


def _label_effect(model) -> float:
    """Mean |v(y=0) - v(y=5)| on fixed noise: how much the class label moves the output."""
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 3, 32, 32, generator=g), torch.full((4,), 0.3), torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        return (model(x, t, y) - model(x, t, y + 5)).abs().mean().item()


def test_authors_init_is_the_default_and_follows_the_spec():
    model = _tiny()
    assert model.config.init == "authors"
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.002
    assert not model.s_embedder.proj.bias.any()
    assert model.local_decoder.enc1[0].bias.abs().max() > 0  # PyTorch's default, not zeroed


def test_variance_preserving_init_opens_the_label_path_the_authors_init_nearly_closes():
    authors, opened = _tiny(), _tiny(init="variance_preserving")
    assert {k: v.shape for k, v in authors.state_dict().items()} == {k: v.shape for k, v in opened.state_dict().items()}
    # at the authors' init the label reaches the output ~1e-9 strong (benchmarks/conditioning.py)
    assert _label_effect(authors) < 1e-6
    assert _label_effect(opened) > 1e-3
    assert abs(opened.y_embedder.embedding_table.weight.std().item() - 1.0) < 0.1
    convs = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    head_layers = [m for m in opened.local_decoder.modules() if isinstance(m, convs)]
    assert len(head_layers) == 14 and all(not m.bias.any() for m in head_layers)
    # what the head's deep path keeps of its input's scale: He-normal keeps it O(1), the default shrinks it
    x = torch.randn(8, 512 + 64, 1, 1)
    for model, lo, hi in ((opened, 0.3, 3.0), (authors, 0.0, 0.3)):
        head = model.local_decoder
        with torch.no_grad():
            d = head.up4(head.bottleneck(x))
            d = head.up3(head.dec4(torch.cat([d, torch.zeros_like(d)], 1)))
        assert lo < d.std().item() / x.std().item() < hi, model.config.init


# ------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("patch", [16, 32, 64])
@pytest.mark.parametrize("head", ["detailer", "linear"])
def test_output_shape_non_square(patch, head):
    model = _tiny(patch_size=patch, head=head)
    x = torch.randn(2, 3, patch * 2, patch * 3)
    v = model(x, torch.rand(2), torch.tensor([3, 10]))  # 10 is the null label
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_rejects_image_not_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        _tiny()(torch.randn(1, 3, 40, 32), torch.rand(1), torch.tensor([0]))


def test_feature_block_returns_tokens_without_changing_output():
    model = _tiny()
    x, t, y = torch.randn(2, 3, 32, 48), torch.rand(2), torch.tensor([1, 2])
    v, tokens = model(x, t, y, feature_block=2)
    assert torch.equal(v, model(x, t, y)) and tokens.shape == (2, 6, 64)


def test_patches_are_processed_independently_by_the_head():
    """Changing one patch's pixels changes only that patch's output when the backbone is frozen out."""
    model = _tiny()
    model.blocks = torch.nn.ModuleList()  # no attention: each token sees only its own patch
    x = torch.randn(1, 3, 32, 32)
    x2 = x.clone()
    x2[..., :16, :16] += 1.0
    t, y = torch.tensor([0.3]), torch.tensor([4])
    d = (model(x2, t, y) - model(x, t, y)).abs()
    assert d[..., :16, :16].sum() > 0
    assert d[..., 16:, :].sum() == 0 and d[..., :16, 16:].sum() == 0


def test_activation_checkpointing_gives_same_output_and_grads():
    plain = _tiny()
    ckpt = _tiny(activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2])
    plain(x, t, y).square().mean().backward()
    ckpt(x, t, y).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------ RoPE


def test_rope_is_relative_along_each_axis_of_a_fixed_grid():
    """<R(p) q, R(p') k> depends only on p' - p for positions on the same grid."""
    torch.manual_seed(0)
    head_dim, h, w = 16, 4, 6
    freqs = rope_2d_frequencies(head_dim, h, w)  # (h*w, head_dim/2)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(pos_q, pos_k):
        qs = apply_rope(q.expand(1, h * w, 1, head_dim).contiguous(), freqs)[0, :, 0]
        ks = apply_rope(k.expand(1, h * w, 1, head_dim).contiguous(), freqs)[0, :, 0]
        return (qs[pos_q[0] * w + pos_q[1]] * ks[pos_k[0] * w + pos_k[1]]).sum()

    torch.testing.assert_close(score((0, 0), (1, 2)), score((2, 3), (3, 5)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score((1, 1), (1, 4)), score((3, 0), (3, 3)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score((0, 0), (1, 2)), score((0, 0), (2, 1)))


def test_rope_positions_depend_on_grid_size_not_index():
    a = rope_2d_frequencies(8, 2, 2)
    b = rope_2d_frequencies(8, 3, 3)
    # the last token of both grids sits at (16, 16): same rotation
    torch.testing.assert_close(a[-1], b[-1])
    # pair 0 rotates by x * f_0 with f_0 = 1: at x = 16 the angle is 16
    torch.testing.assert_close(torch.angle(a[1, 0]), torch.angle(torch.polar(torch.ones(()), torch.tensor(16.0))))
    assert torch.angle(a[1, 1]) == 0  # pair 1 is the y rotation; token 1 has y = 0


def test_cached_rope_equals_recomputed():
    model = _tiny()
    cached = model.rope(3, 5, torch.device("cpu"))
    assert model.rope(3, 5, torch.device("cpu")) is cached
    torch.testing.assert_close(cached, rope_2d_frequencies(model.config.head_dim, 3, 5), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ official layout


def test_official_layout_round_trip(tmp_path):
    model, ema = _tiny(), _tiny()
    for p in ema.parameters():
        torch.nn.init.normal_(p)
    path = tmp_path / "official.ckpt"
    torch.save(export_official_state_dict(model, ema), path)
    loaded_ema = load_official_state_dict(_tiny(), str(path), ema=True)
    loaded_raw = load_official_state_dict(_tiny(), str(path), ema=False)
    for key, value in ema.state_dict().items():
        assert torch.equal(loaded_ema.state_dict()[key], value), key
    for key, value in model.state_dict().items():
        assert torch.equal(loaded_raw.state_dict()[key], value), key
    x, t, y = torch.randn(1, 3, 32, 32), torch.rand(1), torch.tensor([2])
    assert torch.equal(loaded_ema(x, t, y), ema(x, t, y))


def test_plain_state_dict_loads():
    model = _tiny()
    loaded = load_official_state_dict(_tiny(head="detailer"), model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_mismatched_checkpoint_lists_every_problem_and_loads_nothing():
    model = _tiny()
    state = {f"ema_denoiser.{k}": v.clone() for k, v in _tiny().state_dict().items()}
    del state["ema_denoiser.blocks.0.attn.proj.bias"]
    state["ema_denoiser.blocks.9.extra"] = torch.zeros(1)
    state["ema_denoiser.s_embedder.proj.bias"] = torch.zeros(5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_official_state_dict(model, {"state_dict": state})
    message = str(info.value)
    assert "blocks.0.attn.proj.bias" in message and "blocks.9.extra" in message
    assert "s_embedder.proj.bias" in message and "mis-shaped" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_prefix_names_what_is_there():
    state = {f"denoiser.{k}": v for k, v in _tiny().state_dict().items()}
    with pytest.raises(ValueError, match="ema_denoiser"):
        load_official_state_dict(_tiny(), {"state_dict": state}, ema=True)


def test_truncated_checkpoint_file_is_refused(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save(export_official_state_dict(_tiny()), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):
        load_official_state_dict(_tiny(), str(path))


# ------------------------------------------------------------------------------------ objective


def test_interpolant_endpoints_and_target():
    x, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    fm = FlowMatching(num_classes=10)
    assert torch.equal(fm.interpolate(x, noise, torch.zeros(3)), noise)  # t = 0 is pure noise
    assert torch.equal(fm.interpolate(x, noise, torch.ones(3)), x)      # t = 1 is data
    mid = fm.interpolate(x, noise, torch.tensor([0.25, 0.5, 0.75]))
    torch.testing.assert_close(mid[1], 0.5 * x[1] + 0.5 * noise[1])
    assert torch.equal(fm.velocity_target(x, noise), x - noise)


def test_logit_normal_t_and_label_dropout_rates():
    g = torch.Generator().manual_seed(0)
    fm = FlowMatching(num_classes=10, label_dropout=0.1)
    t = fm.sample_t(200_000, "cpu", g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01
    labels = fm.drop_labels(torch.zeros(200_000, dtype=torch.long), g)
    share = (labels == 10).float().mean().item()
    assert abs(share - 0.1) < 0.005 and set(labels.unique().tolist()) == {0, 10}
    with pytest.raises(ValueError, match="label_dropout"):
        FlowMatching(num_classes=10, label_dropout=1.5)


def test_loss_is_mse_on_velocity():
    model = _tiny()
    fm = FlowMatching(num_classes=10, label_dropout=0.0)
    x, noise, t, y = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2])
    loss, parts = fm.loss(model, x, y, t=t, noise=noise)
    expected = (model(t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * noise, t, y) - (x - noise)).square().mean()
    torch.testing.assert_close(loss, expected)
    assert parts["loss_fm"] == loss.detach()


@pytest.mark.parametrize("head", ["detailer", "linear"])
def test_tiny_dip_overfits_a_fixed_batch(head):
    torch.manual_seed(0)
    model = DiP(dip_config("DiP-T/16", num_classes=4, head=head))
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    y, t, noise = torch.arange(8) % 4, torch.rand(8), torch.randn(8, 3, 16, 16)
    fm = FlowMatching(num_classes=4, label_dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(120):
        loss, _ = fm.loss(model, x, y, t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


# ------------------------------------------------------------------------------------ REPA and EMA


def test_repa_term_trains_the_projector_only():
    model = _tiny()
    repa = REPA(TinyEncoder(dim=32, patch=8), hidden_size=64, feature_dim=32, block=1, weight=0.5)
    fm = FlowMatching(num_classes=10)
    loss, parts = fm.loss(model, torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), repa=repa)
    loss.backward()
    assert -1.0 <= parts["loss_repa"].item() <= 1.0
    assert repa.projector.mlp[0].weight.grad is not None
    assert all(p.grad is None for p in repa.encoder.parameters())
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_dinov2_encoder_loads_official_names_from_a_local_file(tmp_path):
    small = DINOv2Encoder(dim=32, depth=1, heads=2, pretrain_grid=4, image_size=28)
    out = small(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert out.shape == (2, 4, 32)
    names = set(DINOv2Encoder().state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.ls2.gamma", "norm.bias"} <= names
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_repa_encoder(str(tmp_path / "dinov2_vitb14_pretrain.pth"))


def test_ema_update_and_state_round_trip():
    model = _tiny()
    ema = EMA(model, decay=0.9)
    before = ema.module.s_embedder.proj.weight.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    current = dict(model.named_parameters())["s_embedder.proj.weight"]
    torch.testing.assert_close(ema.module.s_embedder.proj.weight, 0.9 * before + 0.1 * current)
    other = EMA(_tiny(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.num_updates == 1
    assert torch.equal(other.module.s_embedder.proj.weight, ema.module.s_embedder.proj.weight)


def test_config_is_a_plain_dataclass():
    cfg = dip_config("DiP-XL/32", num_classes=10)
    again = DiPConfig(**dataclasses.asdict(cfg))
    assert again == cfg and again.patch_size == 32
