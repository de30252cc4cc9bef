"""The fuzz tests drive the same real service process as the API tests (tests/api/conftest.py)."""

from tests.api.conftest import service, service_env, start_module_service  # noqa: F401
