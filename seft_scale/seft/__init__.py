"""SEFT, the method, in one place (nothing here imports torch.distributed or the baselines):

  budget.py      K per matrix                 delta.py      SparseDelta: one shard's state
  kernels.py     the linear with a sparse delta (dense / gather kernels, cost rule)
  selection.py   exact top-k over sharded scores (radix select, ties by global position)
  topology.py    drop -> grow -> adapt, initial placement, the budget check
  schedule.py    drop-rate schedules, update steps and windows
  optim.py       slot AdamW (per-slot age), gradient clipping
  checkpoint.py  SEFT state as named tensors, resharded on load
  method.py      SeftMethod: the above over a backend's shards, merge and report
"""
