"""Rollback and consolidation requests: from the control file to the trainer's answer.

    requests = LineageRequests(cfg)
    requests.ask_rollback(3)                           # QueueError when it cannot be made (nothing changes then)
    requests.ask_consolidation("two weeks", job_in_training=False)
    for msg in requests.due(trainer_state, job_in_training, stopping):   # what to send the trainer now
        ...
    requests.answered(msg)                             # rolled_back / rollback_refused / consolidated / ...

Each waits, once asked, until the trainer answers; no file starts meanwhile
(`blocking`). A request sent to a trainer that then died is sent again to the
next one (`trainer_gone`): a consolidation carries the version it merges, so a
trainer that finds it done already answers from the record. Everything a
refusal can be decided on without the trainer (a version not kept, another
generation's version, nothing learnt to merge) is refused here, before the file
in training is touched. Standard library only.
"""

from __future__ import annotations

from daemon import adapters, protocol
from daemon.config import Config
from daemon.errors import QueueError
from daemon.states import TrainerState


class LineageRequests:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rollback: int | None = None  # the version a rollback asks for, until answered
        self.rollback_sent = False
        self.consolidation: str | None = None  # a consolidation's description, until answered
        self.consolidation_sent = False
        self.consolidation_of: int | None = None  # the version it merges (kept across trainer restarts)
        self.consolidation_force = False  # even while a probe is over its limit

    # -- asking --------------------------------------------------------------------------------
    def ask_rollback(self, version: int | None) -> None:
        if self.rollback is not None:
            raise QueueError(f"a rollback to v{self.rollback} is already on its way")
        why = adapters.rollback_refusal(self.cfg.path("adapters"), version) if version is not None else "no version"
        if why is not None:  # refused here, the file in training is never interrupted
            raise QueueError(why)
        self.rollback, self.rollback_sent = version, False

    def ask_consolidation(self, description: str, job_in_training: bool, force: bool = False) -> None:
        if self.consolidation is not None:
            raise QueueError("a consolidation is already on its way")
        if not job_in_training:  # else the file in training publishes first: the trainer decides then
            current = adapters.peek_current(self.cfg.path("adapters"))
            why = "no adapter has been published yet" if current is None else adapters.nothing_learnt(current)
            if why is not None:
                raise QueueError(why)
        self.consolidation, self.consolidation_sent, self.consolidation_force = description, False, force

    # -- sending -------------------------------------------------------------------------------
    @property
    def blocking(self) -> bool:
        """A request waits for its answer: no file starts meanwhile."""
        return self.rollback is not None or self.consolidation is not None

    def doing(self) -> str | None:
        """What a request waiting for its answer means for the status (no file starts meanwhile)."""
        if self.rollback is not None:
            return (f"rolling back to adapter v{self.rollback}" if self.rollback_sent
                    else f"a rollback to adapter v{self.rollback} waits for the trainer")
        if self.consolidation is not None:
            return ("consolidating the adapter into a new base" if self.consolidation_sent
                    else "a consolidation waits for the trainer, between files")
        return None

    def due(self, trainer: TrainerState, job_in_training: bool, stopping: bool, disk_held: bool) -> list[protocol.Message]:
        """What to send the trainer now (the caller marks each sent with `sent`). A rollback goes once the
        trainer is up, mid-file or not; a consolidation only between files; neither while the disk is held (each
        publishes a version, and a full disk would only refuse it)."""
        if stopping or disk_held:
            return []
        out: list[protocol.Message] = []
        if self.rollback is not None and not self.rollback_sent and trainer in (TrainerState.READY, TrainerState.BUSY):
            out.append(protocol.Rollback(version=self.rollback))
        if (self.consolidation is not None and not self.consolidation_sent and not job_in_training
                and trainer is TrainerState.READY):
            if self.consolidation_of is None:  # the version merged; kept if the trainer dies and gets it again
                current = adapters.peek_current(self.cfg.path("adapters"))
                self.consolidation_of = current.version if current else None
            out.append(protocol.Consolidate(description=self.consolidation, adapter_version=self.consolidation_of,
                                            force=self.consolidation_force))
        return out

    def sent(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Rollback):
            self.rollback_sent = True
        elif isinstance(msg, protocol.Consolidate):
            self.consolidation_sent = True

    def trainer_gone(self) -> None:
        """Unanswered requests go to the next trainer."""
        self.rollback_sent = self.consolidation_sent = False

    # -- answers -------------------------------------------------------------------------------
    def answered(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.RolledBack) and msg.rollback_of == self.rollback:
            self.rollback = None
        elif isinstance(msg, protocol.RollbackRefused) and msg.version == self.rollback:
            self.rollback = None
        elif isinstance(msg, (protocol.Consolidated, protocol.ConsolidationRefused)):
            self.consolidation = self.consolidation_of = None


def answer_said(msg: protocol.Message) -> tuple[str, str]:
    """The history event (kind, message) of the trainer's answer to a rollback or a consolidation."""
    match msg:
        case protocol.RolledBack():
            note = (f"; no longer in the adapter (not retrained; drop them again to train them): {', '.join(msg.undone)}"
                    if msg.undone else "")
            return "rollback", f"rolled back to adapter v{msg.rollback_of} (published as v{msg.version}){note}"
        case protocol.RollbackRefused():
            return "control_refused", f"rollback to v{msg.version}: {msg.message}"
        case protocol.Consolidated():
            return "consolidated", (f"adapter v{msg.consolidated_version} merged into generation {msg.generation}'s "
                                    f"base {msg.path} ({msg.files} file(s); max |logit diff| {msg.max_logit_diff:.2e}; "
                                    f"{msg.seconds:.1f} s); training goes on with a fresh adapter "
                                    f"v{msg.adapter_version}: {msg.description}")
        case protocol.ConsolidationRefused():
            return "control_refused", f"consolidate: {msg.message}"
    raise TypeError(f"not an answer to a rollback or a consolidation: {msg.TYPE}")
