"""FLOP counting (models/flops.py) and MFU arithmetic (trainer/tracking/mfu.py) against hand counts."""
import pytest
import torch
import torch.nn as nn

from models.dip import DiPConfig
from models.flops import FlopCount, count_flops, dip_flops, model_flops, module_training_flops
from models.registry import create_model, dip_config
from trainer.tracking.mfu import KNOWN_GPU_KINDS, mfu_metrics, mfu_report, peak_for_device_name

H100_SXM_NAME = "NVIDIA H100 80GB HBM3"  # what torch.cuda.get_device_name() says on an H100 SXM


def _mlp(d_in=8, d_hidden=16, d_out=4) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


def test_two_layer_mlp_matches_hand_count():
    batch = 5
    x = torch.randn(batch, 8)
    forward, per_module = count_flops(lambda: _mlp()(x))
    hand = batch * (2 * 8 * 16 + 2 * 16 * 4)        # 2 * in * out per matmul (multiply + add)
    assert forward == hand == 1920
    assert per_module["Sequential.0"] == batch * 2 * 8 * 16
    assert module_training_flops(_mlp(), x) == 3 * hand


def test_mfu_arithmetic_on_the_hand_counted_mlp():
    train_flops_per_image = 3 * (2 * 8 * 16 + 2 * 16 * 4)   # 1152
    images_per_s = 1e11
    report = mfu_report(train_flops_per_image, images_per_s, device_name_override=H100_SXM_NAME)
    achieved = 1152 * 1e11 / 1e12                           # 115.2 TFLOP/s
    assert report["gpu_kind"] == "H100 SXM"
    assert report["achieved_tflops"] == pytest.approx(achieved)
    assert report["peak_tflops"] == 989.0
    assert report["mfu"] == pytest.approx(achieved / 989.0)
    assert report["practical_peak_tflops"] == 800.0
    assert report["mfu_practical"] == pytest.approx(achieved / 800.0)
    # Eight devices sharing the same global throughput each do an eighth of the work.
    eight = mfu_report(train_flops_per_image, images_per_s, num_devices=8, device_name_override=H100_SXM_NAME)
    assert eight["mfu"] == pytest.approx(report["mfu"] / 8)
    assert mfu_metrics(report) == {"perf/achieved_tflops": pytest.approx(achieved),
                                   "perf/mfu": pytest.approx(achieved / 989.0),
                                   "perf/mfu_practical": pytest.approx(achieved / 800.0)}


def test_mfu_is_none_on_cpu_and_on_unknown_gpus():
    cpu = mfu_report(1e9, 10.0, device="cpu")
    assert cpu["device_name"] == "cpu"
    assert cpu["mfu"] is None and cpu["peak_tflops"] is None and cpu["mfu_practical"] is None
    assert cpu["achieved_tflops"] == pytest.approx(0.01)
    assert mfu_metrics(cpu) == {"perf/achieved_tflops": pytest.approx(0.01)}
    unknown = mfu_report(1e9, 10.0, device_name_override="Tesla V100-SXM2-32GB")  # no bf16 tensor cores
    assert unknown["mfu"] is None and unknown["gpu_kind"] is None
    pcie = mfu_report(1e9, 10.0, device_name_override="NVIDIA H100 PCIe")
    assert pcie["peak_tflops"] == 756.0 and pcie["mfu_practical"] is None  # no practical peak measured there


@pytest.mark.parametrize("name, kind, peak", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.0),
    ("NVIDIA H200", "H200 SXM", 989.0),
    ("NVIDIA GH200 480GB", "GH200", 989.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("NVIDIA L40S", "L40S", 362.0),
    ("NVIDIA L40", "L40", 181.0),
    ("NVIDIA L4", "L4", 121.0),
])
def test_peak_table_picks_the_specific_variant_first(name, kind, peak):
    entry = peak_for_device_name(name)
    assert entry is not None and entry.kind == kind and entry.bf16_dense_tflops == peak
    assert kind in KNOWN_GPU_KINDS


def test_mfu_rejects_bad_input_by_name():
    with pytest.raises(ValueError, match="flops_per_image_train"):
        mfu_report(0, 1.0, device="cpu")
    with pytest.raises(ValueError, match="images_per_s"):
        mfu_report(1.0, -1.0, device="cpu")
    with pytest.raises(ValueError, match="num_devices"):
        mfu_report(1.0, 1.0, device="cpu", num_devices=0)


def _hand_count_dip(config: DiPConfig, resolution: int) -> tuple[int, int]:
    """(forward FLOPs, head FLOPs) per image of a detailer DiP, written out from the spec."""
    C, P, D = config.in_channels, config.patch_size, config.hidden_size
    T = (resolution // P) ** 2
    hidden = int(2 * int(D * config.mlp_ratio) / 3)
    backbone = 2 * T * (C * P * P) * D                          # patch embedding
    backbone += 2 * 256 * D + 2 * D * D                         # timestep MLP (labels: a table lookup)
    per_block = (2 * D * 6 * D                                  # adaLN on the (1, D) condition
                 + 2 * T * D * 3 * D                            # qkv
                 + 2 * T * T * D * 2                            # q k^T and attn v over all heads
                 + 2 * T * D * D                                # output projection
                 + 3 * 2 * T * D * hidden)                      # SwiGLU: w1, w3, w2
    backbone += config.depth * per_block

    def conv(c_in, c_out, k, side):                             # output side x side
        return 2 * c_in * c_out * k * k * side * side

    s = P
    head = (conv(C, 64, 3, s) + conv(64, 128, 3, s // 2) + conv(128, 256, 3, s // 4) + conv(256, 512, 3, s // 8)
            + conv(512 + D, 512, 1, s // 16)
            + conv(512, 512, 2, s // 16) + conv(1024, 256, 3, s // 8)     # up4 (transposed: k*k per input px)
            + conv(256, 256, 2, s // 8) + conv(512, 128, 3, s // 4)
            + conv(128, 128, 2, s // 4) + conv(256, 64, 3, s // 2)
            + conv(64, 64, 2, s // 2) + conv(128, 64, 3, s)
            + conv(64, C, 1, s))
    return backbone + T * head, T * head


def test_dip_count_matches_hand_count_split_by_component():
    config = dip_config("DiP-T/16", num_classes=10)
    count = dip_flops(config, 32)
    forward, head = _hand_count_dip(config, 32)
    assert (count.forward, count.head) == (forward, head)
    assert count.backbone == forward - head
    assert count.training == 3 * forward


def test_real_cpu_count_includes_attention_and_equals_the_meta_count():
    # On CPU tensors SDPA runs an op the stock counter does not know; ours maps it.
    torch.manual_seed(0)
    model = create_model("DiP-T/16", num_classes=10)
    on_cpu = model_flops(model, 32, batch=3)
    assert on_cpu == dip_flops(dip_config("DiP-T/16", num_classes=10), 32)
    x = torch.randn(2, 3, 32, 32)
    forward_backward, _ = count_flops(lambda: model(x, torch.rand(2), torch.tensor([1, 2])).sum().backward())
    # Backward is 2x forward except the input-gradient of the first layer (pixels need none).
    assert 2.9 * on_cpu.forward < forward_backward / 2 <= 3 * on_cpu.forward


def test_dip_xl_16_matches_the_issue_figures():
    xl = dip_flops("DiP-XL/16", 256)
    assert 740e9 < xl.training < 780e9                          # "about 760 GFLOPs per training image"
    assert 0.12 < xl.head_share < 0.15                          # "the head (about 13% of the FLOPs)"
    linear = dip_flops("DiP-XL/16-linear", 256)
    assert linear.head_share < 0.01
    assert linear.backbone == xl.backbone                       # same backbone, different head


def test_bad_inputs_name_the_problem():
    model = create_model("DiP-T/16", num_classes=10)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        model_flops(model, 40)
    with pytest.raises(ValueError, match="batch"):
        model_flops(model, 32, batch=0)
    with pytest.raises(ValueError, match="head"):
        FlopCount(forward=10, head=11)
    with pytest.raises(ValueError, match="unknown model size"):
        dip_flops("DiP-XXL/16", 256)
