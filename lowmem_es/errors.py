"""Errors a user can act on (no heavy imports here: the CLI catches them cheaply)."""


class DistributedError(RuntimeError):
    """A collective failed: a peer died, hung past the timeout, or the network broke."""


class RewardFunctionError(RuntimeError):
    """A reward function raised; the message names it and shows the completion that did it."""


USER_ERRORS = (ValueError, OSError, DistributedError, RewardFunctionError)
