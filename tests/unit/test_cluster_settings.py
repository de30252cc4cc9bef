"""The cluster's settings and names: NODE_NAME goes into PostgreSQL's application_name, where
readiness reads back which node runs each elected worker."""

from __future__ import annotations

import pytest

from infra.settings import Settings, SettingsError
from projections.worker import worker_server_settings


@pytest.mark.parametrize("value", ["node 1", "nœud", "a" * 25, "x;drop", "n@1"])
def test_a_node_name_that_would_not_survive_application_name_refuses_to_start(monkeypatch, value):
    monkeypatch.setenv("NODE_NAME", value)
    with pytest.raises(SettingsError, match="NODE_NAME"):
        Settings.from_env()


def test_node_name_and_replica_settings_are_read(monkeypatch):
    monkeypatch.setenv("NODE_NAME", " node-2.eu_west ")
    monkeypatch.setenv("REPLICA_MAX_WAIT_S", "0.25")
    monkeypatch.setenv("REPLICA_RETRY_S", "3")
    settings = Settings.from_env()
    assert (settings.node_name, settings.replica_max_wait_s, settings.replica_retry_s) == ("node-2.eu_west", 0.25, 3.0)
    monkeypatch.setenv("NODE_NAME", "")
    assert Settings.from_env().node_name is None


def test_the_worker_session_names_its_node_only_when_named():
    assert worker_server_settings("read_model")["application_name"] == "projection:read_model"
    assert worker_server_settings("merkle_tree", "node-3")["application_name"] == "projection:merkle_tree@node-3"
