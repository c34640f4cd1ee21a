"""Model FLOPs utilisation: achieved training FLOP/s over the device's dense bf16 peak.

MFU = images/s x training FLOPs per image / (devices x datasheet dense bf16 peak). Beside it we
report the share of the *measured* practical matmul peak where one was measured on that GPU kind
(an 8192^3 bf16 matmul reached 770-800 TFLOP/s on one H100: ../shared/notes/stack.md): the
datasheet number is not reachable even by a bare matmul, so both views are useful.

On a CPU, or on a GPU missing from the table, the MFU fields are None: never a made-up number.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TERA = 1e12


@dataclass(frozen=True)
class GpuPeak:
    """Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendor's datasheet."""
    kind: str
    bf16_dense_tflops: float
    measured_matmul_tflops: float | None = None  # a practical peak measured here, None if never measured

    def __post_init__(self):
        if not self.bf16_dense_tflops > 0:
            raise ValueError(f"GpuPeak({self.kind!r}).bf16_dense_tflops={self.bf16_dense_tflops}: must be > 0")
        if self.measured_matmul_tflops is not None and not self.measured_matmul_tflops > 0:
            raise ValueError(f"GpuPeak({self.kind!r}).measured_matmul_tflops={self.measured_matmul_tflops}: "
                             "must be > 0 or None")


# Matched against torch.cuda.get_device_name() in this order: the first pattern contained in the
# name wins, so the specific variants come before the generic ones (H100 PCIe before H100, L40S
# before L40 before L4). All names compared upper-case.
# The H100 practical peak: 770-800 TFLOP/s measured; we take the top so the share is not flattered.
_PEAK_TABLE: tuple[tuple[str, GpuPeak], ...] = (
    ("H100 PCIE", GpuPeak("H100 PCIe", 756.0)),
    ("H100 NVL", GpuPeak("H100 NVL", 835.0)),
    ("H100", GpuPeak("H100 SXM", 989.0, measured_matmul_tflops=800.0)),  # "NVIDIA H100 80GB HBM3"
    ("H800", GpuPeak("H800 SXM", 989.0)),
    ("GH200", GpuPeak("GH200", 989.0)),                                  # contains "H200": first
    ("H200 NVL", GpuPeak("H200 NVL", 835.0)),
    ("H200", GpuPeak("H200 SXM", 989.0)),
    ("B200", GpuPeak("B200", 2250.0)),
    ("A100", GpuPeak("A100", 312.0)),
    ("A800", GpuPeak("A800", 312.0)),
    ("L40S", GpuPeak("L40S", 362.0)),
    ("L40", GpuPeak("L40", 181.0)),
    ("L4", GpuPeak("L4", 121.0)),
)
KNOWN_GPU_KINDS = tuple(peak.kind for _, peak in _PEAK_TABLE)


def peak_for_device_name(name: str) -> GpuPeak | None:
    """The table entry for a CUDA device name, or None for an unknown GPU (and for a CPU)."""
    upper = name.upper()
    for pattern, peak in _PEAK_TABLE:
        if pattern in upper:
            return peak
    return None


def device_name(device: torch.device | str | None = None) -> str:
    """'cpu', or the CUDA device's marketing name (e.g. 'NVIDIA H100 80GB HBM3')."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def mfu_report(flops_per_image_train: float, images_per_s: float, device: torch.device | str | None = None,
               num_devices: int = 1, device_name_override: str | None = None) -> dict:
    """MFU figures for a measured training throughput.

    flops_per_image_train: training FLOPs per image (models.flops: 3x forward).
    images_per_s: images/s over all `num_devices` devices together.
    Returns achieved_tflops (per device, always), and peak_tflops / mfu / practical_peak_tflops /
    mfu_practical, each None where the device has no known peak (CPU, unknown GPU).
    """
    if not flops_per_image_train > 0:
        raise ValueError(f"flops_per_image_train={flops_per_image_train}: must be > 0")
    if not images_per_s >= 0:
        raise ValueError(f"images_per_s={images_per_s}: must be >= 0")
    if not (isinstance(num_devices, int) and num_devices >= 1):
        raise ValueError(f"num_devices={num_devices!r}: must be an integer >= 1")
    name = device_name_override or device_name(device)
    achieved = images_per_s * flops_per_image_train / num_devices / TERA   # TFLOP/s per device
    peak = None if name == "cpu" else peak_for_device_name(name)
    report = {"device_name": name, "gpu_kind": None, "achieved_tflops": achieved, "peak_tflops": None, "mfu": None,
              "practical_peak_tflops": None, "mfu_practical": None}
    if peak is not None:
        report.update(gpu_kind=peak.kind, peak_tflops=peak.bf16_dense_tflops, mfu=achieved / peak.bf16_dense_tflops)
        if peak.measured_matmul_tflops is not None:
            report.update(practical_peak_tflops=peak.measured_matmul_tflops,
                          mfu_practical=achieved / peak.measured_matmul_tflops)
    return report


def mfu_metrics(report: dict) -> dict[str, float]:
    """The numeric entries of an mfu_report, ready for MLflow (None and names dropped)."""
    keys = ("achieved_tflops", "mfu", "mfu_practical")
    return {f"perf/{key}": float(report[key]) for key in keys if report.get(key) is not None}
