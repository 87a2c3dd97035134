"""docker-compose.yml and the nginx config: no Docker engine runs here, so their shape is checked instead."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from storage.mongo import MongoStorage

ROOT = Path(__file__).resolve().parent.parent


def test_compose_runs_two_eddies_on_one_replica_set_behind_nginx():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["mongo"]["command"][-3:] == ["--replSet", "rs0", "--bind_ip_all"]
    assert "rs.initiate" in " ".join(services["mongo"]["healthcheck"]["test"])
    eddies = [services["eddy-1"], services["eddy-2"]]
    urls = {e["environment"]["EDDY_STORAGE"] for e in eddies}
    assert len(urls) == 1  # both watch the same store: that is the scale-out
    url = urls.pop()
    assert MongoStorage(url).database_name == "eddy" and "replicaSet=rs0" in url
    for eddy in eddies:
        assert eddy["build"] == "." and eddy["depends_on"]["mongo"]["condition"] == "service_healthy"
        assert "?" in eddy["environment"]["EDDY_JWT_SECRET"]  # required from the operator, never a default
    assert "./deploy/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in services["nginx"]["volumes"]


def test_nginx_passes_the_websocket_upgrade_to_both_instances():
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert re.findall(r"server (eddy-\d):8888", conf) == ["eddy-1", "eddy-2"]
    assert "proxy_http_version 1.1;" in conf
    assert "proxy_set_header Upgrade $http_upgrade;" in conf
    assert "proxy_set_header Connection $connection_upgrade;" in conf
    assert "proxy_buffering off;" in conf  # Server-Sent Events
