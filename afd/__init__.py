"""AFD shared core: model spec, checkpoints, placement, frames and transports used by every role."""

__version__ = "0.1.0"
