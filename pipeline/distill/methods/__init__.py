"""Distillation methods, one family per module (the taxonomy of the field): response, feature, relation,
contrastive, online, self, multi-teacher, adversarial, cross-modal and data-free. Each method is one small class
registered by name in METHODS; base.py holds the interface and the option handling."""
# imported in the taxonomy's order, which is the order `edgecompress methods` lists them in
from . import response  # isort: skip
from . import feature  # isort: skip
from . import relation  # isort: skip
from . import contrastive  # isort: skip
from . import online  # isort: skip
from . import selfdistill  # isort: skip
from . import multi_teacher  # isort: skip
from . import adversarial  # isort: skip
from . import cross_modal  # isort: skip
from . import datafree  # isort: skip
from .base import (LAYER_OPTIONS, METHODS, Distiller, Features, FeatureTap, Setup, build, ce, coerce, kd_loss,
                   method_options, options, register, resolve_options, soft_kd_loss)
from .cross_modal import VIEWS, CrossModal
from .datafree import METHOD_DATAFREE, DataFreeConfig
from .multi_teacher import confidence_weights
from .response import dkd_loss

__all__ = ["LAYER_OPTIONS", "METHODS", "METHOD_DATAFREE", "VIEWS", "CrossModal", "DataFreeConfig", "Distiller",
           "FeatureTap", "Features", "Setup", "adversarial", "build", "ce", "coerce", "confidence_weights",
           "contrastive", "cross_modal", "datafree", "dkd_loss", "feature", "kd_loss", "method_options",
           "multi_teacher", "online", "options", "register", "relation", "resolve_options", "response",
           "selfdistill", "soft_kd_loss"]
