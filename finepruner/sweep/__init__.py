"""Sweeps: grid configs (``config``), the SQLite results store (``store``), the runner (``runner``),
per-question scores (``scores``) and paired statistics (``stats``). See docs/sweeps.md."""

from finepruner.sweep.config import Cell, Sweep, SweepConfigError, load_sweep, parse_sweep
from finepruner.sweep.stats import Comparison, mcnemar, paired_bootstrap
from finepruner.sweep.store import SCHEMA_VERSION, ResultsStore, StoreError

__all__ = [
    "Cell", "Comparison", "ResultsStore", "SCHEMA_VERSION", "StoreError", "Sweep", "SweepConfigError",
    "load_sweep", "mcnemar", "paired_bootstrap", "parse_sweep",
]
