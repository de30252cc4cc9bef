"""Real service processes for the HTTP tests: `service` and `client` (one process for the module, on
the module's database; a module overrides `service_env` to change its settings), and
`start_service` for a test that needs processes of its own, on its own database."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from harness.databases import ThrowawayDatabase
from harness.live import LiveService


class ServiceStarter:
    """Starts `python -m cli serve` processes on one database; `stop_all` stops each and checks
    that it drained and shut down cleanly."""

    def __init__(self, database: ThrowawayDatabase, folders: pytest.TempPathFactory) -> None:
        self._database = database
        self._folders = folders
        self._started: list[LiveService] = []

    def __call__(self, **env: str) -> LiveService:
        live = LiveService(self._database.owner_dsn, self._folders.mktemp("svc") / "service.log", **env)
        try:
            live.start()
        except BaseException:
            live.stop()  # one that never became ready must not outlive the test
            raise
        self._started.append(live)
        return live

    def stop_all(self) -> None:
        for live in self._started:
            assert live.stop_gracefully(), live.log()


# Each starter depends on its database, so its services stop before the database is dropped.


@pytest.fixture
def start_service(database, tmp_path_factory) -> Iterator[ServiceStarter]:
    """`start_service(SETTING="value", ...)`: a service of this test's own, on its `database`."""
    starter = ServiceStarter(database, tmp_path_factory)
    yield starter
    starter.stop_all()


@pytest.fixture(scope="module")
def start_module_service(module_database, tmp_path_factory) -> Iterator[ServiceStarter]:
    starter = ServiceStarter(module_database, tmp_path_factory)
    yield starter
    starter.stop_all()


@pytest.fixture(scope="module")
def service_env() -> dict[str, str]:
    """Settings (environment variables) for the module's `service`: the defaults unless the module
    overrides this fixture."""
    return {}


@pytest.fixture(scope="module")
def service(start_module_service, service_env) -> LiveService:
    """One real service process for the module's tests, on the module's database."""
    return start_module_service(**service_env)


@pytest.fixture(scope="module")
def client(service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as http:
        yield http
