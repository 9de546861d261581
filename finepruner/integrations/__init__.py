"""Integrations with other evaluation tools (optional extras; nothing here is imported by ``import finepruner``).

* :mod:`finepruner.integrations.lmms_eval`: the ``finepruner`` model of lmms-eval (``pip install
  finepruner[lmms]``), registered through lmms-eval's ``lmms_eval.models`` entry-point group (spec
  ``eval_protocol.md`` §15.3-15.4). The module needs lmms-eval.
* :mod:`finepruner.integrations.lmms_tasks`: writes lmms-eval task YAMLs and local data files for benchmarks
  kept in LLaVA's ``playground/data/eval`` layout (the toy suite included), so lmms-eval runs them offline.
  Writing the files needs no lmms-eval; running them does.
"""

from __future__ import annotations

from typing import Any

#: The model name of the lmms-eval plugin (``lmms-eval --model finepruner``).
LMMS_MODEL_ID = "finepruner"


def lmms_eval_models() -> Any:
    """The entry point of lmms-eval's model registry (group ``lmms_eval.models`` in pyproject.toml): the
    manifest of the ``finepruner`` model. A function here rather than a constant in the plugin module, so
    that the registry can load it while ``lmms_eval.models`` is still being imported, whichever of
    lmms-eval and the plugin module is imported first."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_MODEL_ID,
                         simple_class_path="finepruner.integrations.lmms_eval.FinePruner")
