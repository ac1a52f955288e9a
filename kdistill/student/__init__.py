"""Build a smaller student of the teacher's own class, initialised from the teacher's weights.

Two independent reductions, applied together by `build_student`:
  layers       depth: which teacher layers are kept (`select_layers`, ShortGPT's `block_influence`), renumbered
  width        width of BERT-family encoders: heads, FFN neurons and hidden channels ranked and sliced
               (decoders with grouped-query attention: `kdistill.decoder_width`)
  calibration  the calibration batch both rank the teacher's units on
  build        `build_student` (the `init` names) and `describe_student`
  vocab        `trim_vocabulary`: a trained student's WordPiece vocabulary cut to the tokens its texts use
"""

from kdistill.student.build import INIT_CHOICES, build_student, count_parameters, describe_student
from kdistill.student.layers import (
    LAYER_LIST_SUFFIXES,
    LAYER_MAPS,
    block_influence,
    check_layers,
    find_layer_list,
    most_influential,
    num_layers_of,
    select_layers,
)
from kdistill.student.width import (
    WIDTH_PRUNABLE_TYPES,
    WidthPlan,
    importance_scores,
    plan_width,
    resolve_width,
    resolve_widths,
)
from kdistill.student.vocab import check_trimmable, trim_vocabulary

__all__ = [
    "INIT_CHOICES",
    "LAYER_LIST_SUFFIXES",
    "LAYER_MAPS",
    "WIDTH_PRUNABLE_TYPES",
    "WidthPlan",
    "block_influence",
    "build_student",
    "check_layers",
    "check_trimmable",
    "count_parameters",
    "describe_student",
    "find_layer_list",
    "importance_scores",
    "most_influential",
    "num_layers_of",
    "plan_width",
    "resolve_width",
    "resolve_widths",
    "select_layers",
    "trim_vocabulary",
]
