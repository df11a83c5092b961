"""The trainer side of traind: the one place torch, transformers, peft and bitsandbytes are imported.

    python -m daemon.train --config status/running_config.json    # what the service spawns (daemon/child.py)

Modules, leaf first: `tinymodel` (the embedded base, built locally), `data`
(tokenise, split and stream a file), `batching` (micro-batches: length
grouping, packed rows), `model` (load the base 4-bit or not, attach the LoRA,
capabilities), `checkpoint` (mid-file checkpoints), `activity` (per-layer LoRA
activity), `step` (one optimizer step, the held-out loss, the exact
shortcuts), `levers` (the speed levers: each switch applied in one place and
reported with counts), `loop` (the explicit training loop over one file),
`threads` (CPU threads and their governor), `process` (the child's process
set-up), `worker` (the session kept across files and the messages).

Nothing here knows about queue folders, HTTP or the CLI; the service side of
`daemon/` never imports this package (tests/test_imports.py checks it).
"""
