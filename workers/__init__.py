"""Data-parallel training on Ray: worker actors, worker groups, all-reduce, the per-job trainer.

- :mod:`workers.trainer`: :func:`~workers.trainer.run_job`, one job from start to
  finish, with restarts, rollbacks and cancellation.
- :mod:`workers.group`: :class:`~workers.group.WorkerGroup`, actors in a placement group.
- :mod:`workers.worker`: :class:`~workers.worker.TrainWorker`, one rank (a plain class).
- :mod:`workers.allreduce`: the all-reduce backends (``ray``, ``gloo``, ``nccl``).
- :mod:`workers.errors`, :mod:`workers.config`: typed errors and tunables (no Ray needed).

Nothing is imported here, so ``workers.errors`` can be imported without Ray.
"""
