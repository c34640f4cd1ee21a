"""What this project takes from library internals, and the library versions it was tested with.

Some features reach past a library's public API: DeepSpeed's flat-partition layout and optimizer
attributes (checkpoint re-partitioning, the sharded EMA, the non-finite step skip, checkpoint I/O) and
Ray Train's controller internals (the checkpoint before an elastic grow). Such internals change without
notice between releases, and a changed layout would not fail loudly: it would read or write the wrong
numbers. So each such feature is named here with the package and the version it was tested with, and
is only used with a release of the same minor series (`~=tested`: the same major.minor, that patch or
newer). Outside it a feature either refuses to start (`require`: one line naming the feature, the
package, the installed and the tested version) or takes its documented safe path (`supported`: the
caller falls back and says so).

It lives beside the checkpoint code because most of the internals are checkpoint formats; the driver
(cluster/driver/elastic.py) reads the same table, as it already depends on trainer.checkpoint.
Re-test and move a pin here when a pinned library is upgraded (docs/design.md, /work/shared/notes/stack.md).
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import Version


@dataclass(frozen=True)
class Pin:
    package: str   # the distribution name, as pip knows it
    tested: str    # the version this project's tests ran against
    uses: str      # which internals, for the message


# feature -> (package, tested version, the internals it uses)
PINS: dict[str, Pin] = {
    "ZeRO checkpoint re-partitioning": Pin(
        "deepspeed", "0.19.8", "the flat fp32 partition layout of ZeRO-1/2/3 optimizer states and "
                               "DeepSpeed's checkpoint file names"),
    "sharded EMA": Pin(
        "deepspeed", "0.19.8", "ZeRO-3 parameters' ds_tensor / ds_numel partition attributes"),
    "non-finite step skip": Pin(
        "deepspeed", "0.19.8", "the optimizers' overflow path and engine.skipped_steps"),
    "DeepSpeed checkpoint loading": Pin(
        "deepspeed", "0.19.8", "the classes DeepSpeed pickles into its checkpoints (loss scalers, ZeRO "
                               "stage enum, fragment addresses) allowed for torch.load(weights_only=True)"),
    "MLflow tracking URI per call": Pin(
        "mlflow-skinny", "3.17.2", "mlflow.tracking._tracking_service.utils._use_tracking_uri"),
    "elastic checkpoint before grow": Pin(
        "ray", "2.60.0", "Ray Train V2's ElasticScalingPolicy and the trainer's controller start-up "
                         "(ray.train.v2._internal)"),
}


def installed_version(package: str) -> str | None:
    """The installed distribution's version (None: not installed)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def mismatch(feature: str) -> str | None:
    """Why `feature` cannot trust the installed library (None: it can)."""
    pin = PINS[feature]
    found = installed_version(pin.package)
    if found is not None and Version(found) in SpecifierSet(f"~={pin.tested}"):
        return None
    return (f"{feature} uses {pin.package} internals ({pin.uses}) tested with {pin.package}=={pin.tested}; "
            f"installed: {pin.package}=={found or 'none'}")


def require(feature: str) -> None:
    """Refuse to start `feature` with an untested release of the library whose internals it uses."""
    reason = mismatch(feature)
    if reason is not None:
        raise RuntimeError(f"{reason}: refusing to start; install {PINS[feature].package}=={PINS[feature].tested} "
                           f"(or re-test the feature and move its pin in trainer/checkpoint/pins.py)")


def supported(feature: str) -> bool:
    """Whether `feature` may use the internals; False: the caller takes its documented safe path."""
    return mismatch(feature) is None
