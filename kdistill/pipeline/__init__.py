"""The pipeline's stages, as plain functions every task composes: preflight checks (preflight.py), the student
and its terms (students.py), the distillation phase (distillation.py), the encoder tasks' run (encoder.py), the
frame they share (common.py) and the verbs over a recipe or a model dir (verbs.py). A task's own pipeline lives
in its module (kdistill/tasks/); `run` asks the recipe's task for it."""

from kdistill.pipeline.common import run_dir_of, training_data
from kdistill.pipeline.distillation import distill_student
from kdistill.pipeline.encoder import get_teacher, run_encoder, teacher_run
from kdistill.pipeline.preflight import preflight
from kdistill.pipeline.students import calibration_batch, make_student, term_spec
from kdistill.pipeline.verbs import data_for_model, evaluate_dir, run, signal_run

__all__ = ["calibration_batch", "data_for_model", "distill_student", "evaluate_dir", "get_teacher", "make_student",
           "preflight", "run", "run_dir_of", "run_encoder", "signal_run", "teacher_run", "term_spec",
           "training_data"]
