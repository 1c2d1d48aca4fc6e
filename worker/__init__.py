"""coc-change-worker: Kafka change events in, COC change-ticket API calls, outcome events out."""

__version__ = "0.1.0"
