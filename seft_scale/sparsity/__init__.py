"""The SEFT algorithm on local shards: budgets, schedules, N:M groups, drop/grow/adapt.

Nothing here imports torch.distributed: a backend passes an `allreduce` callable (or None) and the
shards it holds; the exact global choices come from seft_scale.selection.
"""
