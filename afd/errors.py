"""Typed errors shared by every role, so callers can tell bad input from broken infrastructure."""

from __future__ import annotations


class AfdError(Exception):
    """Base class of every error AFD raises on purpose."""


class ConfigError(AfdError, ValueError):
    """A config (config.json, cluster YAML, engine options) is invalid."""


class UnsupportedArchitectureError(ConfigError):
    """config.json names an architecture AFD cannot split."""

    def __init__(self, architecture: str | None, supported: list[str]) -> None:
        self.architecture = architecture
        self.supported = supported
        super().__init__(f"unsupported architecture {architecture!r}; supported architectures: {', '.join(supported)}")


class CheckpointError(AfdError, ValueError):
    """The checkpoint on disk does not match its config."""


class MissingTensorError(CheckpointError):
    """A tensor the role needs is absent from the checkpoint."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape differs from what the config implies."""


class RequestError(AfdError, ValueError):
    """A generation request is malformed (empty prompt, bad sampling params, too long)."""


class PeerError(AfdError, RuntimeError):
    """A remote node failed, timed out or answered with an error."""

    def __init__(self, peer: str, message: str) -> None:
        self.peer = peer
        super().__init__(f"peer {peer}: {message}")
