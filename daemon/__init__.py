"""traind's daemon package: the service, the CLI (`cli/`), the trainer (`train/`, the one place torch is imported)
and the standard-library modules they share. A regular package on purpose: a namespace package loses to any
installed regular package of the same name (python-daemon's `daemon`); tests/test_imports.py checks it wins.

The service process's own modules are `daemon.service` (see its docstring); shared, flat here: config,
states, errors, protocol, schema, status, jobqueue, intake, validate, jsonl, adapters, control, atomic,
diskspace, lockedkeys, dataset, ledger, lock, logs, health, activity (the summary the service keeps).
"""
