"""The fault harness of the reliability scenarios (``tests/integration/test_reliability.py``).

* ``proxy.TcpProxy``      -- asyncio TCP proxy with ``cut()`` / ``restore()`` (refuse or blackhole);
* ``process.WorkerProcess`` -- the real worker as a subprocess: spawn, SIGTERM, SIGKILL, ``/readyz``, RSS;
* ``stream.make_stream``  -- a known stream: many tickets, ordered events each, keyed by ticket;
* ``harness.Rig``         -- one scenario's topics, simulator, workers, readers and commit samples;
  ``harness.ProxiedBroker`` -- a Tansu broker advertising a proxy's address;
* ``ledger.check``        -- the ledger: one final outcome per input, at most one application per
  event, per-ticket order, commits only over finished work, nothing lost;
* ``report``              -- the ``docs/reliability.md`` table.
"""
