"""The search: Ray Tune + Optuna across methods, Ray Train per trial, under a budget.

Modules (import what you need; only ``search`` and ``trainable`` pull in Ray):
  space.py      search-space YAML loading/validation, define-by-run Optuna space
  budget.py     ``parse_budget`` and the persisted ``Ledger``
  trainable.py  one trial: Tune function trainable running a TorchTrainer
  search.py     ``run_search(SearchOptions)``: the driver, resume, store rows
  progress.py   the live rich table
See docs/search.md.
"""
