"""Plumbing shared by train.py, eval.py and distill.py: flat CLI flags from a config dataclass, run folders and
atomic checkpoints with exact-resume state, loading and encoding the data splits."""
