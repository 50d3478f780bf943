"""Task definitions of the paper's real settings (epmq.tasks).

* :mod:`epmq.tasks.clip` -- the 8/14/20 CLIP image-classification tasks: hub data, class names, templates;
* :mod:`epmq.tasks.glue` -- the 8 GLUE tasks for FLAN-T5 as text-to-text: prompts, label words, scoring;
* :mod:`epmq.tasks.heads` -- zero-shot heads through a CLIP text tower, and their on-disk cache.

Importing this package is cheap: torch / transformers are imported inside the functions that need them.
"""

from epmq.tasks.clip import TASKS_8, TASKS_14, TASKS_20, ClipTask, get_task, task_list
from epmq.tasks.glue import GLUE_TASKS, GlueTask, format_example, get_glue_task, label_words, parse_stsb, score
from epmq.tasks.heads import cached_head, head_meta, hf_clip_text_encoder, zeroshot_head

__all__ = [
    "GLUE_TASKS", "TASKS_8", "TASKS_14", "TASKS_20", "ClipTask", "GlueTask", "cached_head", "format_example",
    "get_glue_task", "get_task", "head_meta", "hf_clip_text_encoder", "label_words", "parse_stsb", "score",
    "task_list", "zeroshot_head",
]
