"""SkipViz: run layer-skipping networks for real, see every decision, audit it.

Entry points: :func:`create_model` (one call over a registry of model families) and
:meth:`SkipNetwork.run` (execute a batch under a :class:`Policy`, really skipping bypassed blocks).

The packages: ``engine`` (the network, its heads, folding, rows, FLOPs, traces), ``policies``, ``models``
(families, registry, the weights' metadata), ``measure`` (latency), ``evaluate``, ``redundancy``, ``explain``,
``figures`` (with ``figures_explain`` and ``figures_audit``), ``audit``, ``training``, ``cli`` (the ``skipviz``
command) and ``dashboard`` (what the pages call; with ``dashboard_models``, ``dashboard_tables`` and
``dashboard_latency``, whose names it re-exports).
"""
from ._allocator import AllocatorSetting, allocator_setting, keep_heap_memory
from ._checkpoint import CheckpointError, load_state_dict
from ._env import __version__  # noqa: F401  (skipviz.__version__)
from ._imageio import ImageInfo, ImageLoadError, load_image
from .engine.flops import FlopTable
from .engine.folding import inference_folding
from .engine.blocks import SkippableBlock
from .engine.heads import GateHead, PlanHead, ProbeHead
from .engine.network import SkipNetwork
from .engine.trace import BlockDecision, Reason, SampleTrace, SkipResult, traces_to_dataframe
from .models import CIFAR_MODEL, DEFAULT_MODEL, create_model, data_dir, list_models, list_pretrained
from .models.cifar_import import import_cifar_resnet
from .models.weights import ModelMeta
from .policies import (Decision, EarlyExitPolicy, FullPolicy, GatePolicy, Plan, PlanPolicy, Policy,
                       StaticMaskPolicy, policy_for, policy_from_config)

__all__ = [
    "AllocatorSetting", "BlockDecision", "CheckpointError", "CIFAR_MODEL", "DEFAULT_MODEL", "Decision", "EarlyExitPolicy",
    "FlopTable", "FullPolicy", "GateHead", "GatePolicy", "ImageInfo", "ImageLoadError", "ModelMeta", "Plan",
    "PlanHead", "PlanPolicy", "Policy", "ProbeHead", "Reason", "SampleTrace", "SkipNetwork", "SkipResult",
    "SkippableBlock", "StaticMaskPolicy", "allocator_setting", "create_model", "data_dir", "import_cifar_resnet",
    "inference_folding", "keep_heap_memory", "list_models", "list_pretrained", "load_image", "load_state_dict", "policy_for", "policy_from_config",
    "traces_to_dataframe",
]
