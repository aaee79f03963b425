"""Fixtures of the workflow and session end-to-end tests (helpers: workflow_support).

`ops` is a Harness on an in-process server (fake clock) built from the shared
`settings` fixture with a long liveness timeout, so moving the clock for leases and
retries does not also take agents OFFLINE. A test changes settings with
`@pytest.mark.opscore_settings(name=value, ...)`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest
from workflow_support import Harness

from opscore.domain.clock import FakeClock
from opscore.server.config import Settings

if TYPE_CHECKING:
    from conftest import StartServer

    from opscore.server.app import OpsCoreServer


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "opscore_settings(**values): settings overrides for the `ops` server"
    )


@pytest.fixture
def wf_settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    overrides: dict[str, object] = {"liveness_timeout": 3600, "liveness_check_interval": 5}
    marker = request.node.get_closest_marker("opscore_settings")
    if marker is not None:
        overrides.update(marker.kwargs)
    return settings.model_copy(update=overrides)


@pytest.fixture
async def wf_server(
    start_server: StartServer, wf_settings: Settings, clock: FakeClock
) -> OpsCoreServer:
    return await start_server(wf_settings, clock)


@pytest.fixture
async def ops(wf_server: OpsCoreServer, clock: FakeClock) -> AsyncIterator[Harness]:
    async with grpc.aio.insecure_channel(wf_server.address) as channel:
        harness = Harness(channel, clock)
        yield harness
        await harness.close()
