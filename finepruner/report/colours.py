"""One colour per method in every plot (report plots, the demo, the bench's Pillow plot).

``method_colour(name)`` is fixed for the registered methods and, for any other name, chosen from a
second palette by a CRC-32 of the name, so it is the same in every process and every figure whatever
else is drawn beside it. Labels that start with a method name (``"fastv K=3"``, ``"fastv@64"``,
``"fastv:score_impl=eager@64"``) get the method's colour.
"""

from __future__ import annotations

import zlib
from types import MappingProxyType

#: The colour of each registered method (matplotlib's tab10 hues; vanilla black, random grey).
METHOD_COLOURS = MappingProxyType({
    "vanilla": "#000000",
    "random": "#7f7f7f",
    "fastv": "#1f77b4",
    "finepruner": "#d62728",
    "pdrop": "#ff7f0e",
    "sparsevlm": "#2ca02c",
    "vispruner": "#9467bd",
    "cdpruner": "#8c564b",
    "dart": "#e377c2",
    "divprune": "#17becf",
    "pool": "#bcbd22",
    "visionzip": "#393b79",
    "prumerge": "#637939",
    "prumerge_plus": "#8c6d31",
    "hiprune": "#00766c",
})
#: Colours for other method names (tab20's light hues), picked by a stable hash of the name.
_OTHER_COLOURS = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
                  "#dbdb8d", "#9edae5")


def method_name(label: str) -> str:
    """The method of a plot label or variant label (``"fastv"``, ``"fastv K=3"``, ``"fastv@64"``,
    ``"fastv:score_impl=eager@64"`` all give ``"fastv"``)."""
    return label.strip().split()[0].split("@")[0].split(":")[0].lower() if label.strip() else ""


def method_colour(method: str) -> str:
    """The hex colour of ``method`` (or of a label starting with it) in every plot: fixed for the
    registered methods, otherwise chosen by a CRC-32 of the name (the same in every process)."""
    name = method_name(method)
    if name in METHOD_COLOURS:
        return METHOD_COLOURS[name]
    return _OTHER_COLOURS[zlib.crc32(name.encode("utf-8")) % len(_OTHER_COLOURS)]


def method_rgb(method: str) -> tuple[int, int, int]:
    """``method_colour`` as an (r, g, b) tuple of 0-255 integers (for Pillow drawings)."""
    colour = method_colour(method).lstrip("#")
    return int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16)


__all__ = ["METHOD_COLOURS", "method_colour", "method_name", "method_rgb"]
