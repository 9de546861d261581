"""Integrations with other evaluation tools (optional extras; nothing here is imported by ``import finepruner``).

* :mod:`finepruner.integrations.lmms_eval`: the ``finepruner`` model of lmms-eval (``pip install
  finepruner[lmms]``), registered through lmms-eval's ``lmms_eval.models`` entry-point group (spec
  ``eval_protocol.md`` §15.3-15.4). The module needs lmms-eval.
* :mod:`finepruner.integrations.lmms_tasks`: writes lmms-eval task YAMLs and local data files for benchmarks
  kept in LLaVA's ``playground/data/eval`` layout (the toy suite included), so lmms-eval runs them offline.
  Writing the files needs no lmms-eval; running them does.
"""
