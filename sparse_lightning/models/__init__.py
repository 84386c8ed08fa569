from sparse_lightning.models.classifier import ImageClassifier, LitClassifier, torchvision_classifier
from sparse_lightning.models.mnist1d import MNIST1DCNN, MNIST1DMLP, mnist1d_cnn, mnist1d_mlp

__all__ = [
    "ImageClassifier",
    "LitClassifier",
    "MNIST1DCNN",
    "MNIST1DMLP",
    "mnist1d_cnn",
    "mnist1d_mlp",
    "torchvision_classifier",
]
