"""The apps: command-line entry points (absl). The only modules that read flags.

  train        mid-train / python train.py: every stage (stages.py)
  export       mid-export / python export.py: a SavedModel for TF Serving (export/)
  eval_helper  the helper processes the eval stage starts with --eval_workers
"""
