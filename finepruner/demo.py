"""``finepruner demo``: placeholder module registering the demo command (filled in by the engine)."""
