"""The method interface, mdistiller-style: each is one small class whose `forward_train` returns
`(student_logits, {loss_name: loss})`; the trainer (distill/trainer.py) sums the losses.

A method declares what it needs as class attributes, so the trainer builds hooks, teacher forwards and extra
optimised modules only when asked:

- `uses_teacher`: False for schemes without a fixed teacher (the baseline, mutual learning, self-distillation).
- `teacher_features`: the teacher must be a torch model with feature hooks (feature, relation and contrastive
  methods), run every step, or once over the training images when they are not augmented and its features fit
  the feature cache (distill.feature_cache_gb); an ONNX teacher is refused. Otherwise the teacher's logits are
  computed once and cached, or with augmentation recorded per epoch in the FKD cache (data/softlabels.py).
- `student_features`: the student's features are captured by hooks: `feature_maps` (paired stage ends) and/or
  `embeddings` (the input of the last linear layer, for relation and contrastive methods).
- `last_pair_only`: of the paired feature maps the method reads only the last (both models are hooked there
  only, and a feature cache holds that map alone).
- `kd_config`: the method takes distill.temperature / distill.alpha (its KD term is Hinton's).
- `many_teachers`: accepts several teachers (their logits stacked as (K, B, C)); every other method refuses more
  than one.
- `needs_index`: the dataset index of each sample (CRD's memory bank).
- `supplies_inputs`: the method makes its own training inputs (data-free distillation): the pipeline then runs
  its own distill stage (distill/datafree.py), which never reads the training images or labels.

Trainable parts beyond the student (regressors, projection heads, discriminators, auxiliary heads, peer students)
are submodules of the distiller, so `distiller.parameters()` hands them to the one optimizer; `distiller.student`
is what gets saved.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BadInput

METHODS: dict[str, type["Distiller"]] = {}


def register(cls: type["Distiller"]) -> type["Distiller"]:
    if cls.name in METHODS:
        raise ValueError(f"distillation method {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


@dataclass
class Features:
    """What one network showed on a batch: paired feature maps (same order for student and teacher) and the
    embedding (the input of its last linear layer)."""

    maps: list[torch.Tensor] = field(default_factory=list)
    embedding: torch.Tensor | None = None


@dataclass
class Setup:
    """Facts about the models and data that methods size their extra modules from (filled by the trainer)."""

    num_classes: int
    train_labels: torch.Tensor | None = None  # the label of every training image, by dataset index (CRD)
    student_shapes: list[tuple[int, ...]] = field(default_factory=list)  # (C, H, W) of each paired student map
    teacher_shapes: list[tuple[int, ...]] = field(default_factory=list)
    student_embedding_dim: int = 0
    teacher_embedding_dim: int = 0
    student_stage_shapes: list[tuple[int, ...]] = field(default_factory=list)  # every student stage end
    new_student: Callable[[], nn.Module] | None = None  # a fresh student of the same architecture (DML peers)


class FeatureTap:
    """Forward hooks that keep the outputs of modules named by path, and the input of one linear layer."""

    def __init__(self, model: nn.Module, layers: list[str], embedding: str = ""):
        modules = dict(model.named_modules())
        for path in [*layers, *([embedding] if embedding else [])]:
            if path not in modules:
                hint = difflib.get_close_matches(path, list(modules), n=1)
                raise BadInput(f"no module {path!r} in {type(model).__name__}"
                               f"{f' (did you mean {hint[0]!r}?)' if hint else ''}")
        self.layers, self.embedding_path, self.outputs, self.embedding = layers, embedding, {}, None
        self.handles = [modules[p].register_forward_hook(self._keep(p)) for p in layers]
        if embedding:
            self.handles.append(modules[embedding].register_forward_pre_hook(self._keep_input))

    def _keep(self, path: str):
        def hook(_module, _inputs, output):
            self.outputs[path] = output
        return hook

    def _keep_input(self, _module, inputs):
        self.embedding = inputs[0]

    def take(self) -> Features:
        """The features of the last forward, and forget them (they hold the autograd graph)."""
        found = Features([self.outputs[p] for p in self.layers], self.embedding)
        self.outputs, self.embedding = {}, None
        return found

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Distiller(nn.Module):
    name = ""
    family = ""
    paper = ""
    defaults: dict = {}
    uses_teacher = True
    teacher_features = False
    student_features = False
    feature_maps = False
    embeddings = False
    last_pair_only = False
    kd_config = False
    many_teachers = False
    needs_index = False
    supplies_inputs = False

    def __init__(self, student: nn.Module, setup: Setup, **hparams):
        super().__init__()
        self.student = student
        self.setup = setup
        self.hp = hparams
        self.tap: FeatureTap | None = None
        self.progress = 0.0  # fraction of training done, set by the trainer (for warm-ups)

    def attach(self, layers: list[str], embedding: str) -> None:
        """Hook the student's paired layers and embedding (called by the trainer for feature methods)."""
        self.tap = FeatureTap(self.student, layers, embedding)

    def forward(self, *args, **kwargs):  # DistributedDataParallel calls forward
        return self.forward_train(*args, **kwargs)

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                      teacher: Features | None = None, index: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def student_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        logits = self.student(x)
        return logits, (self.tap.take() if self.tap else Features())


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y)


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Z(z) = (z - mean(z)) / (std(z) + 1e-7) over the classes of each sample, std the unbiased one: logit
    standardisation (Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024,
    arXiv:2403.01427; as its code's `normalize`). The student then matches the shape of the teacher's logits,
    not their scale, which a small student cannot reach."""
    z = logits.float()
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-7)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            standardized: bool = False) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the batch (Hinton et al., 2015); with
    `standardized`, z is standardize(z) for both (logit standardisation)."""
    if standardized:
        student_logits, teacher_logits = standardize(student_logits), standardize(teacher_logits)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def soft_kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """kd_loss against given teacher probabilities (already softened at T), e.g. a combination of teachers."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, teacher_probs.float(), reduction="batchmean") * temperature**2



class FeatureDistiller(Distiller):
    uses_teacher = teacher_features = student_features = feature_maps = True


class RelationDistiller(Distiller):
    uses_teacher = teacher_features = student_features = embeddings = True




# options every method comparing feature maps accepts; the trainer reads them to pair layers
# (distill.pair_layers): module paths, paired by position
LAYER_OPTIONS = ("student_layers", "teacher_layers")


def options(cls: type[Distiller]) -> dict:
    return {**cls.defaults, **({k: [] for k in LAYER_OPTIONS} if cls.feature_maps else {})}


def coerce(method: str, key: str, value, default):
    """`value` (a string from --method-opt, or a TOML value) as the type of the option's default."""
    where = f"--method-opt {key} for {method}"
    if isinstance(default, list):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
            raise BadInput(f"{where} must be a comma-separated list of module paths, got {value!r}")
        return [i.strip() for i in items]
    if isinstance(value, str) and not isinstance(default, str):
        text = value.strip().lower()
        try:
            value = {"true": True, "false": False}[text] if isinstance(default, bool) else \
                int(text) if isinstance(default, int) else float(text)
        except (KeyError, ValueError):
            raise BadInput(f"{where} must be {type(default).__name__}, got {value!r}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise BadInput(f"{where} must be {type(default).__name__}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadInput(f"{where} must be a finite number, got {value!r}")
    return value


def resolve_options(method: str, given: dict) -> dict:
    """The method's defaults updated by `given`, each value typed; unknown keys refused with the nearest one."""
    if method not in METHODS:
        hint = difflib.get_close_matches(method, list(METHODS), n=1)
        raise BadInput(f"unknown distillation method {method!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}: "
                       f"choose one of {', '.join(METHODS)} (see `edgecompress methods`)")
    known = options(METHODS[method])
    resolved = dict(known)
    for key, value in given.items():
        if key not in known:
            hint = difflib.get_close_matches(key, list(known), n=1)
            valid = ", ".join(known) or "none"
            raise BadInput(f"method {method} has no option {key!r}"
                           f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; its options: {valid}")
        resolved[key] = coerce(method, key, value, known[key])
    return resolved


def build(method: str, student: nn.Module, setup: Setup | None = None, **given) -> Distiller:
    """The method `method` around `student`, its hyperparameters the paper's defaults updated by `given`."""
    hp = resolve_options(method, given)
    hp = {k: v for k, v in hp.items() if k not in LAYER_OPTIONS}
    return METHODS[method](student, setup or Setup(num_classes=0), **hp)


def method_options(conf) -> dict:
    """The options given to the method of a [distill] config: distill.temperature/alpha for the methods that take
    them (Hinton-style KD terms), then distill.method_opts, which win."""
    cls = METHODS[conf.method]
    given = {k: v for k, v in (("temperature", conf.temperature), ("alpha", conf.alpha)) if cls.kd_config}
    return resolve_options(conf.method, {**given, **conf.method_opts})
