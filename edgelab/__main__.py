"""`python -m edgelab ...`: the `edgelab` command (what `torchrun -m edgelab distill` starts on each rank)."""
from .cli import main

raise SystemExit(main())
