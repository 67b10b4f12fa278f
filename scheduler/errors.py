"""Root error type of the runtime; the service maps these to HTTP statuses in one place."""


class SchedulerError(Exception):
    """Base of every error the runtime raises on purpose."""


class InvalidJobSpec(SchedulerError):
    """A job specification cannot run on this engine (names the offending field)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class JobNotFound(SchedulerError):
    pass


class AdapterNotServed(SchedulerError):
    pass


class AdapterBusy(SchedulerError):
    """A second running job on one adapter, or a similar conflict."""


class JobStateConflict(SchedulerError):
    """The action does not apply to the job's current state (e.g. pausing a finished job)."""


class NoCapacity(SchedulerError):
    """Not enough LoRA slots for what was asked."""


class EngineSelfTestFailed(SchedulerError):
    pass
