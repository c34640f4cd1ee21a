"""The run's configuration. `load_config` reads a YAML file plus `key=value` overrides into a validated
`TrainConfig` (strict pydantic sections: a bad key or value is one line naming the key, the value and
what is allowed); `to_dict` / `to_yaml` / `flatten` write it back out; `config_hash` and
`resume_incompatibilities` decide whether a checkpoint may resume under it; `BatchSplit` and
`solve_batch_split` are the batch arithmetic at each world size.

Import from here, not from the submodules (sections, batch, overrides, compat).
"""
from data.config import DataConfig
from trainer.config.batch import BatchSplit, solve_batch_split
from trainer.config.compat import config_hash, resume_incompatibilities, shape_signature
from trainer.config.overrides import config_from_dict, flatten, load_config, parse_override, to_dict, to_yaml
from trainer.config.sections import (MODEL_WEIGHTS, PRECISIONS, REPA_OFF, REPA_TINY, RESUME_MODES, SAMPLING_METHODS,
                                     SYNTHETIC_REF, SYNTHETIC_REF_START, ZERO_STAGES, CheckpointSection,
                                     ClusterSection, EvalSection, ModelSection, ObjectiveSection, OptimSection,
                                     SamplesSection, TrackingSection, TrainConfig, TrainSection)

__all__ = [
    "BatchSplit", "CheckpointSection", "ClusterSection", "DataConfig", "EvalSection", "MODEL_WEIGHTS",
    "ModelSection", "ObjectiveSection", "OptimSection", "PRECISIONS", "REPA_OFF", "REPA_TINY", "RESUME_MODES",
    "SAMPLING_METHODS", "SYNTHETIC_REF", "SYNTHETIC_REF_START", "SamplesSection", "TrackingSection",
    "TrainConfig", "TrainSection", "ZERO_STAGES", "config_from_dict", "config_hash", "flatten", "load_config",
    "parse_override", "resume_incompatibilities", "shape_signature", "solve_batch_split", "to_dict", "to_yaml",
]
