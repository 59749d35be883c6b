"""Errors a user can act on (no heavy imports here: the CLI catches them cheaply)."""


class DistributedError(RuntimeError):
    """A collective failed: a peer died, hung past the timeout, or the network broke."""


class RewardFunctionError(RuntimeError):
    """A reward function raised; the message names it and shows the completion that did it."""


class KernelError(RuntimeError):
    """A Triton kernel broke the CUDA context at its start-up check: nothing can run on
    the GPU in this process any more; the message says how to restart without kernels."""


class CheckpointError(ValueError):
    """A checkpoint, adapter file or journal line is missing, truncated, edited or fails
    its checksums; the message names the file (and line) and how to recover."""


USER_ERRORS = (ValueError, OSError, DistributedError, RewardFunctionError, KernelError)
