"""Language models over interchangeable recurrent cores."""

from .cores import DGLSTMLayer, LSTMLayer, RecurrentStack, RNNLayer, build_core
from .lm import LanguageModel, build_model, check_backend, count_parameters

__all__ = [
    "DGLSTMLayer",
    "LSTMLayer",
    "LanguageModel",
    "RNNLayer",
    "RecurrentStack",
    "build_core",
    "build_model",
    "check_backend",
    "count_parameters",
]
