"""Typed exceptions raised by the engine.

Every error a user can cause derives from :class:`SglRayError` and carries an HTTP-style ``status_code`` and an
OpenAI-style ``type``/``param`` so the serving layer can turn it into ``{"error": {...}}`` without guessing.
"""

from __future__ import annotations


class SglRayError(Exception):
    """Base class of all sgl_ray errors."""

    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(SglRayError, ValueError):
    """The request is malformed: bad sampling parameters, prompt too long, wrong types."""

    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(SglRayError, LookupError):
    """The model (or adapter) named by the request is not served here."""

    status_code = 404
    error_type = "not_found_error"


class ModelLoadError(SglRayError, RuntimeError):
    """A model path could not be resolved or its weights/config could not be read."""

    error_type = "model_load_error"


class UnsupportedModelError(ModelLoadError):
    """The architecture named in the model's config has no implementation here."""


class EngineDeadError(SglRayError, RuntimeError):
    """The engine stopped (shut down or crashed); pending requests fail with this."""

    status_code = 503
    error_type = "engine_dead"


class InsufficientResourcesError(SglRayError, RuntimeError):
    """The Ray cluster can never hold the engine's shards: its nodes have fewer CPUs or GPUs in total than the
    shards' placement group needs. The message names what is missing and how to start Ray with more."""

    status_code = 503
    error_type = "insufficient_resources"


class ResourcesBusyError(InsufficientResourcesError):
    """The Ray cluster could hold the engine's shards, but others hold the resources: the placement group was not
    placed within ``placement_timeout``. The message names what is free and what holds the rest."""

    error_type = "resources_busy"


class RayClusterUnreachableError(SglRayError, ConnectionError):
    """The Ray cluster to join (``--address``, ``RAY_ADDRESS``, ``address="auto"``) does not answer at its
    address."""

    status_code = 503
    error_type = "ray_cluster_unreachable"


class RequestAbortedError(SglRayError, RuntimeError):
    """The request was aborted before it finished."""

    status_code = 499
    error_type = "request_aborted"


class StepLostError(SglRayError, RuntimeError):
    """The model shards lost a step and their KV (a shard died and the group was rebuilt). The scheduler resumes
    every running request from the tokens it has already generated."""

    status_code = 503
    error_type = "step_lost"


class UnsupportedFeatureError(SglRayError, NotImplementedError):
    """The request asks for something this build or backend does not do (yet): image inputs, prompt scoring
    on a chat-only API."""

    status_code = 501
    error_type = "not_implemented"


class RemoteError(SglRayError, RuntimeError):
    """A server answered with an error that maps to no more specific class; ``status_code`` and ``error_type``
    are the server's."""

    def __init__(self, message: str, *, status_code: int, error_type: str, **kw) -> None:
        super().__init__(message, **kw)
        self.status_code, self.error_type = status_code, error_type
