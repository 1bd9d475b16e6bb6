"""Evaluation: robust accuracy under attacks in two threat models (transfer, white-box).

  stage.py      the eval stage: the models of a model_dir -> report written, logged, printed
  report.py     build_report(ReportInput) -> the report dict (inputs.py: what it is about)
  pieces.py     the independent pieces the report is made of (one attack, one model's checks)
  scheduler.py  pieces claimed and crafted by several processes; the helper processes
  memo.py       finished pieces on disk (resume, sharing)
  sanity.py     known / unknown attack groups, the summary, the gradient-masking flags
  writers.py    the schema; report.json, report.md, PNG figures, TensorBoard, console table
  robustness.py crafting adversarials and scoring accuracy, batch by batch
"""
