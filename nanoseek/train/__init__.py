"""Training: the one loop every stage plugs into, and pre-training on top of it.

* ``config.py``   typed TOML recipes ([model] [data] [optim] [train] [spike]) and ``--set`` overrides
* ``optim.py``    the optimizer ([optim] optimizer: AdamW, or Muon for the hidden matrices + AdamW) and the
                  WSD / cosine / constant learning-rate schedules
* ``muon.py``     the Muon optimizer (torch.optim.Muon's algorithm over stacked expert matrices)
* ``spike.py``    the loss-spike guard: skip a fast spike, roll back a slow blow-up
* ``checkpoint.py`` atomic, pickle-free training checkpoints with keep-last-K and ``latest``
* ``metrics.py``  metrics.jsonl (+ TensorBoard / W&B), MFU against a measured matmul peak, progress bar
* ``loop.py``     :class:`Trainer`: tasks provide ``batches()`` and ``loss(model, batch)``; SFT, DPO and
                  GRPO reuse it unchanged
* ``dsa.py``      DeepSeek-V3.2's indexer training: the dense warm-up, then sparse training (the stage of
                  each step, the indexers' KL collected from the task's forwards)
* ``synthetic.py`` a generated token stream with the real loader's interface (benchmarks, smoke tests)
* ``pretrain.py`` the pre-training task (CE + lambda MTP + sequence-wise balance loss) and its wiring
* ``pretrain_cli.py`` ``nanoseek pretrain``
* ``eplb.py``     DeepSeek's EPLB: redundant-expert placement (hierarchical and global policies) and the
                  per-GPU load imbalance of a placement; ``eplb_loads.py`` the expert loads a run logged
                  (or synthetic ones at DeepSeek-V3's size); ``eplb_cli.py`` ``nanoseek eplb``

Nothing heavy is imported here, so ``nanoseek --help`` stays fast: import the submodules.
"""
