"""The project's exceptions: one root, a few kinds a caller can tell apart."""


class TraindError(Exception):
    """Root of every error traind raises on purpose."""


class ConfigError(TraindError):
    """The config is invalid; the message lists every problem at once."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s):\n{lines}")


class LockedKeyError(TraindError):
    """A key that shapes the adapter changed since the adapter was created."""

    def __init__(self, changes: list[tuple[str, object, object]]) -> None:
        self.changes = list(changes)
        lines = "\n".join(f"  - {k}: adapter was trained with {old!r}, config now says {new!r}" for k, old, new in self.changes)
        super().__init__(
            "locked keys changed since the adapter was created:\n"
            f"{lines}\n"
            "Put the old values back, or approve the change with `trainctl config approve` "
            "(see README: what an approved change does to the adapter)."
        )


class AlreadyRunningError(TraindError):
    """Another daemon holds this instance's lock."""

    def __init__(self, pid: int | None, lock_path: str) -> None:
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"traind is already running for this instance ({who}, lock {lock_path})")


class DataError(TraindError):
    """A data file cannot be used; the message names file, line and field."""


class QueueError(TraindError):
    """A queue operation was refused (unknown name, wrong folder, ...)."""


class GuardTripped(TraindError):
    """Training of a file stopped by a guard (a non-finite loss or gradient, a loss spike): the adapter goes
    back to its state before the file, the file to failed/ with this message, and the daemon pauses."""

    def __init__(self, what: str, loss: float, grad_norm: float | None, step: int | None = None) -> None:
        self.what, self.loss, self.grad_norm, self.step = what, loss, grad_norm, step
        super().__init__(self.describe())

    def describe(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        norm = f", gradient norm {self.grad_norm:.4g}" if self.grad_norm is not None else ""
        return f"{self.what}{at} (loss {self.loss:.4g}{norm})"
