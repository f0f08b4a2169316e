"""lm-evaluation-harness task YAMLs shipped with layerscope (the `lm_eval` task, worker/evaluation/tasks/lm_eval_task.py).

The folder is on every TaskManager's include path, so its task names (`layerscope_sciq_mc`,
`layerscope_truthfulqa_mc`) work like lm-eval's own. They read a local file given as
`lm_eval.data_files` (see README, "Evaluation tasks"); `utils.py` turns it into multiple choice.
"""
