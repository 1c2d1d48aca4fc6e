"""Tools for the worker's users: producers (``send``, ``validate``), downstream consumers and operators
(``outcomes tail``, ``dlq list|replay``).

Each module does one job and is driven by ``worker.cli``; none of them imports the CLI. Kafka is
reached only through ``worker.tools.kafka_io``.
"""
