"""traind's daemon package: the service, the CLI (`cli/`), the trainer (`train/`, the one place torch is imported)
and the standard-library modules they share. A regular package on purpose: a namespace package loses to any
installed regular package of the same name (python-daemon's `daemon`); tests/test_imports.py checks it wins.

The service process's own modules are `daemon.service` (see its docstring). Shared, flat here:
- files and their one writer: atomic (every durable write), jobqueue (the queue's folders), adapters (the
  adapter store and its `AdapterManifest`), status (`training_status.json`), history_db (`history.db`),
  control (control requests), lock, lockedkeys, logs
- data: jsonl, validate, intake, sample_ledger (the lines each step consumed), dataset_ledger (the file
  contents a lineage learnt)
- the contracts: protocol (every service-trainer message, on wire, its typed codec), schema (the status's
  fields), states, errors, config (typed, frozen, validated at load), bases (what `base_model` may name)
- reports: activity_summary (per-layer activity totals and the status block), health, diskspace
"""
