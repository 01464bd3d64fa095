"""SkipViz: run layer-skipping networks for real, see every decision, audit it.

Entry points: :func:`create_model` (one call over a registry of model families) and
:meth:`SkipNetwork.run` (execute a batch under a :class:`Policy`, really skipping bypassed blocks).
"""
from ._allocator import AllocatorSetting, allocator_setting, keep_heap_memory
from ._checkpoint import CheckpointError, load_state_dict
from ._imageio import ImageInfo, ImageLoadError, load_image
from ._registry import create_model, data_dir, list_models, list_pretrained
from .network import FlopTable, GateHead, PlanHead, ProbeHead, SkippableBlock, SkipNetwork, inference_folding
from .policies import (Decision, EarlyExitPolicy, FullPolicy, GatePolicy, Plan, PlanPolicy, Policy,
                       StaticMaskPolicy, policy_for, policy_from_config)
from .trace import BlockDecision, Reason, SampleTrace, SkipResult, traces_to_dataframe
from .weights import ModelMeta

__version__ = "0.1.0"

DEFAULT_MODEL = "cifar_resnet20.cifar10_gated"

__all__ = [
    "AllocatorSetting", "BlockDecision", "CheckpointError", "DEFAULT_MODEL", "Decision", "EarlyExitPolicy",
    "FlopTable", "FullPolicy", "GateHead", "GatePolicy", "ImageInfo", "ImageLoadError", "ModelMeta", "Plan",
    "PlanHead", "PlanPolicy", "Policy", "ProbeHead", "Reason", "SampleTrace", "SkipNetwork", "SkipResult",
    "SkippableBlock", "StaticMaskPolicy", "allocator_setting", "create_model", "data_dir", "inference_folding",
    "keep_heap_memory", "list_models", "list_pretrained", "load_image", "load_state_dict", "policy_for", "policy_from_config",
    "traces_to_dataframe",
]
