"""The service process: everything only the daemon itself runs (it never imports torch).

    from daemon.service import Service
    Service(cfg, config_path).run()          # python -m daemon

Modules, one owner each:
- loop: the Service, its loop read top to bottom in `tick()`, life cycle, control requests, dispatch
- state: the status derived from the facts the loop keeps; publisher: the status file's one writer
- trainer_said: what the trainer says of itself (`ready`, a refused config); controls: the person's requests;
  stopping: the warm stop and the hard one
- lineage_requests: rollback and consolidation requests, until the trainer answers
- dispatch: what the trainer is handed next, and what is refused before it sees it
- tracker: the file in training: its reports, its queue moves, its records
- supervisor, child: the trainer child process (start, restart with backoff, the socket it talks over)
- diskguard: holds for a full or unwritable disk, and what is said about them
- inbox, openfiles: which inbox files are complete (settled, closed by their writer)
- finished: files that changed under traind, at their end and after it
- wakeup: wake-ups of the loop (the inbox watcher, signals)
- notify: webhooks; autogen: data when idle; rank_status: several trainer ranks in the status
Shared with the CLI, the monitor and the trainer: the flat modules of daemon/ (its docstring lists them).
"""

from daemon.service.loop import EXIT_ALREADY_RUNNING, EXIT_LOCKED_KEYS, EXIT_OK, RUNNING_CONFIG, Service

__all__ = ["EXIT_ALREADY_RUNNING", "EXIT_LOCKED_KEYS", "EXIT_OK", "RUNNING_CONFIG", "Service"]
