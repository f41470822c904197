"""`afd status --router URL`: --watch for two refreshes, --expert-heatmap and --json against a fake router.

The fake router (tests/fake_openai_server.py) serves a fixed /afd/v1/cluster on 127.0.0.1 in a thread and is
stopped by the fixture.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from orchestration.cli import app
from tests.fake_openai_server import FakeOpenAIServer, FakeServerBehavior
from tests.unit.test_status_rendering import VIEW


@pytest.fixture
def router_url() -> Iterator[str]:
    server = FakeOpenAIServer(FakeServerBehavior(cluster=VIEW)).start()
    try:
        yield server.base_url
    finally:
        server.shutdown()


def test_status_watch_heatmap_and_json_against_a_router(router_url, tmp_path):
    runner = CliRunner()
    watched = runner.invoke(
        app, ["status", "--router", router_url, "--watch", "--iterations", "2", "--interval", "0.1"]
    )
    assert watched.exit_code == 0, watched.output
    assert "attn-0" in watched.output and "ffn-1" in watched.output and "Ctrl-C to stop" in watched.output
    image = tmp_path / "heat.png"
    drawn = runner.invoke(app, ["status", "--router", router_url, "--expert-heatmap", str(image)])
    assert drawn.exit_code == 0, drawn.output
    assert image.read_bytes()[:4] == b"\x89PNG" and "expert heatmap written" in drawn.output
    as_json = runner.invoke(app, ["status", "--router", router_url, "--json"])
    assert json.loads(as_json.output)["expert_load"] == VIEW["expert_load"]


def test_status_errors_are_clear(router_url):
    runner = CliRunner()
    bad = runner.invoke(app, ["status", "--router", router_url, "--watch", "--interval", "0"])
    assert bad.exit_code == 2 and "--interval must be at least" in bad.output
    for args in (["--expert-heatmap", "x.png"], ["--json"]):
        gone = runner.invoke(app, ["status", "--router", "http://127.0.0.1:9", *args])
        assert gone.exit_code == 2 and "error:" in gone.output and "Traceback" not in gone.output
    missing = runner.invoke(app, ["status", "--name", "no-such-cluster", "--watch"])
    assert missing.exit_code == 2 and "no running cluster" in missing.output
