"""Exceptions a user can act on. The CLI prints their message on one line and exits non-zero."""


class FastrunError(Exception):
    """Base class: an error whose message is meant for the user, not a bug."""


class ModelError(FastrunError):
    """The model file is missing, unreadable, invalid or uses something fastrun cannot run."""


class InputError(FastrunError):
    """A feed or a requested shape does not match the model."""


class PlanNotFoundError(FastrunError):
    """No cached plan exists and the policy forbids running without one."""
