"""DiP model, objective, samplers and EMA: pure torch (no I/O, no Ray, no DeepSpeed)."""
from .dip import DiP, DiPConfig
from .official import export_official_state_dict, load_official_state_dict
from .registry import DIP_SIZES, create_model, dip_config

__all__ = [
    "DiP", "DiPConfig", "load_official_state_dict", "export_official_state_dict",
    "DIP_SIZES", "create_model", "dip_config",
]
