"""The interop tests use the API tests' real service process (one per module)."""

from tests.api.conftest import client, service, service_env, start_module_service  # noqa: F401
