"""Bring the local dev stack (MLflow + moto S3 + Ray head, see ``infra.stack``) up for tests.

Usage in a test module::

    from tests.stack_fixture import local_stack  # noqa: F401  (pytest fixture)

    @pytest.mark.e2e
    def test_something(local_stack):
        env = local_stack            # dict: MLFLOW_TRACKING_URI, RAY_ADDRESS, AWS_*, SPARSEGEN_BUCKET, ...
        local_stack.state_dir        # the stack's state dir (logs under state_dir / "logs")

or, outside pytest fixtures, ``with running_stack(path) as env: ...``. The stack is module-scoped
(starting it takes ~20 s) and always torn down, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


class StackEnv(dict):
    """The client environment of a running stack (a plain ``dict``) plus where its state lives."""

    def __init__(self, env: dict[str, str], state_dir: Path, state: dict):
        super().__init__(env)
        self.state_dir = Path(state_dir)
        self.state = state

    def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Export this environment for the current test (and drop AWS settings that would interfere)."""
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        for key, value in self.items():
            monkeypatch.setenv(key, value)


@contextlib.contextmanager
def running_stack(state_dir: str | os.PathLike, **up_kwargs) -> Iterator[StackEnv]:
    """``infra.stack.up`` on enter, ``infra.stack.down`` on exit (also on errors)."""
    from infra import stack

    state = stack.up(state_dir, **up_kwargs)
    try:
        yield StackEnv(stack.client_env(state), Path(state["state_dir"]), state)
    finally:
        stack.down(state_dir)


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory) -> Iterator[StackEnv]:
    """A running local stack for the tests of one module; yields its client env (a ``StackEnv``)."""
    with running_stack(tmp_path_factory.mktemp("stack"), timeout=120) as env:
        yield env


@pytest.fixture
def stack_env(local_stack, monkeypatch) -> StackEnv:
    """``local_stack`` with its environment exported for the current test."""
    local_stack.apply(monkeypatch)
    return local_stack
