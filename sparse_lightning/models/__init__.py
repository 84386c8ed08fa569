from sparse_lightning.models.classifier import ImageClassifier, LitClassifier, torchvision_classifier
from sparse_lightning.models.mnist1d import MNIST1DCNN, MNIST1DMLP

__all__ = [
    "ImageClassifier",
    "LitClassifier",
    "MNIST1DCNN",
    "MNIST1DMLP",
    "torchvision_classifier",
]
