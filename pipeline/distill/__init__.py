"""The distill stage (stage.py), its one training loop (trainer.py), the layers feature methods compare
(layers.py), the teacher's features computed once for them (feature_cache.py) and data-free distillation
(datafree.py); the methods themselves are in methods/ (edgecompress.distill.methods)."""
from .layers import Prepared, pair_layers, prepare, shapes_of, stage_ends, unwrap
from .stage import (STAGE, TeacherAnswers, inputs, load_teachers, pair_transform, run, soft_label_key, teacher_logits,
                    teacher_specs)
from .trainer import Distributed, build_student, device_and_precision

__all__ = ["STAGE", "Distributed", "Prepared", "TeacherAnswers", "build_student", "device_and_precision", "inputs",
           "load_teachers", "pair_layers", "pair_transform", "prepare", "run", "shapes_of", "soft_label_key",
           "stage_ends", "teacher_logits", "teacher_specs", "unwrap"]
