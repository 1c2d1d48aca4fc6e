"""``python -m worker`` is the same as ``coc-worker``."""

from worker.cli import main

raise SystemExit(main())
