"""A local, Replicate-compatible sandbox server: the offline default and the test double.

Same paths, bodies, status codes, problem+json errors and headers as Replicate's predictions API for
``black-forest-labs/flux-kontext-dev``; real (visibly edited) output images on a separate origin;
fault injection switchable per instance. See `SandboxConfig` for every switch.
"""

from kontext.sandbox.runner import Sandbox, main
from kontext.sandbox.service import RecordedRequest
from kontext.sandbox.settings import SandboxConfig

__all__ = ["RecordedRequest", "Sandbox", "SandboxConfig", "main"]
