"""Model families; importing this package registers them with :func:`skipviz.create_model`.

``_registry`` (``create_model``, ``DEFAULT_MODEL``), ``weights`` (``ModelMeta``: the model card), one module per
family (``timm_wrap``: any timm network, with ``_timm_families`` and ``_timm_weights`` below it), and ``toy``
(random-init stand-ins for timing and tests).
"""
from ._registry import CIFAR_MODEL, DEFAULT_MODEL, create_model, data_dir, list_models, list_pretrained  # noqa: F401
from . import cifar_resnet, efficientnet_lite, torchvision_resnet  # noqa: F401,E402  (register the families)

__all__ = ["CIFAR_MODEL", "DEFAULT_MODEL", "create_model", "data_dir", "list_models", "list_pretrained"]
