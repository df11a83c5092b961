"""The trainer side of traind: the one place torch, transformers, peft and bitsandbytes are imported.

    python -m daemon.train --config status/running_config.json    # what the service spawns (daemon/service/child.py)

Modules, leaf first:
- the model: `tinymodel` (the embedded base, built locally), `convert` (a GGUF base, converted once), `model`
  (load the base 4-bit or not, attach the LoRA, capabilities), `levers` (the speed levers: each switch applied in
  one place and reported with counts) and what they apply (`fused`, `norms`, `lastblock`, `precision`),
  `sharding` (FSDP), `ranks` and `launch` (several processes under torchrun)
- training one file: `data` (tokenise, split and stream a file), `batching` (micro-batches: length grouping,
  packed rows), `step` (one optimizer step, the held-out loss), `loop` (the explicit training loop over one
  file), `checkpoint` (mid-file checkpoints), `activity_probe` (per-layer LoRA activity), `tboard`, `threads`
- the child process: `process` (set-up), `preflight` (can this config run here), `session` (what is kept
  across files, loading, messages mid-file), `forgetting` (probes and earlier files' keep-sets scored after every file, the gate), `lineage`
  (publish, roll back, consolidate: the one writer of the adapter store), `follower` (the other ranks),
  `worker` (rank 0's messages and one file from start to answer; `main`)
- beside the daemon: `consolidate` (merge into a new base), `inspect` (`trainctl sample`/`eval`), `oneshot`
  (`traind train`)

Nothing here knows about queue folders, HTTP or the CLI; the service side of
`daemon/` never imports this package (tests/test_imports.py checks it).
"""
