"""What evaluate's tables hold, for the stages that read them (``report``).

metrics/comparison.csv: one row per task x rank x source x sample: task, rank, source, sample,
heldout, the detection metrics (map50_95, map50, map75, precision, recall, f1, num_pred) and,
for generated samples, parameter-space novelty (nn_distance, novelty_ratio, nn_cosine) and
function-space novelty (error_iou with the nearest training checkpoint, error_iou_checkpoints
between two checkpoints of the task itself).

metrics/bootstrap.csv: one row per rank x task x comparison ("generated - <source>"):
difference (of mAP50 on the full split), ci_low, ci_high (the paired bootstrap's interval),
verdict (better / worse / indistinguishable), resamples, confidence. Rows whose task is one of
the POOLED names average the per-task differences over a group of tasks.

metrics/cross_task.csv: rank, adapter_task, eval_task, map50 of generated z = 0 adapters.
"""

POOLED_TRAINING = "training tasks (mean)"
POOLED_HELDOUT = "held-out tasks (mean)"
