"""Model families; importing this package registers them with :func:`skipviz.create_model`."""
from . import cifar_resnet, torchvision_resnet  # noqa: F401
