"""The ``torchrpc`` backend: a c10d point-to-point ring, not ``torch.distributed.rpc``.

The coordinator (rank 0) and one worker process per stage pass every message around
``0 -> 1 -> ... -> S -> 0``:

- :mod:`~noodle.executors.ring.coordinator`: :class:`TorchRpcExecutor`, rank 0 (the executor users pick with
  ``--backend torchrpc``);
- :mod:`~noodle.executors.ring.worker`: the rank side, one stage per process;
- :mod:`~noodle.executors.ring.wire`: the typed message header and its int64 encoding;
- :mod:`~noodle.executors.ring.transport`: the process groups and :class:`Ring`, which moves messages;
- :mod:`~noodle.executors.ring.lanes`: the ring as two pipeline lanes (send, receive) for the scheduler.
"""
