"""Training: stage-1 trainers, resumable fit, and (in meta.py) the MID meta-learner."""
