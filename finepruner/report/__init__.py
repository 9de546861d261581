"""Reports from the results store: tables (``tables``), plots (``plots``), kept-token overlays and
per-head attention grids (``overlays``), paired comparisons of stored runs (``compare``)."""
