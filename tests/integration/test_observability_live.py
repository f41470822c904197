"""A live local cluster (router + 1 attention + 2 FFN processes) after a few requests: every series the Grafana
dashboard reads is in the router's /metrics, and `afd status --router` draws the expert heatmap from the
router's real expert counts and shows the nodes in --watch.

Series that only appear after an event a healthy run does not have (a refused or migrated request) are the
only ones allowed to be missing. Every process is started by `LocalCluster` on 127.0.0.1 with ephemeral ports
and stopped by its handle.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from afd.builtin_model import builtin_model_dir
from orchestration.cli import app
from orchestration.local_cluster import LocalCluster, LocalClusterConfig
from tests.unit.test_grafana_dashboard import DASHBOARD, dashboard_expressions, metric_names

pytestmark = pytest.mark.slow

ONLY_AFTER_AN_EVENT = {"afd:requests_rejected_total", "afd:requests_migrated_total"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    config = LocalClusterConfig(
        model=builtin_model_dir(tmp_path_factory.mktemp("cache")), http_port=0, threads_per_node=1, start_timeout_s=120
    )
    cluster = LocalCluster(config)
    try:
        cluster.start()
        client = openai.OpenAI(base_url=cluster.api_url, api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        for prompt in ("the file object is used to read", "return a new list of values"):
            for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=8, stream=True):
                assert chunk.choices is not None
            client.completions.create(model=model, prompt=prompt, max_tokens=8)
        yield cluster
    finally:
        cluster.stop(timeout=20)
        cluster.remove_workdir()


def _scraped(base_url: str) -> set[str]:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_dashboard_series_is_scraped_from_a_live_router(live):
    expressions = dashboard_expressions(json.loads(DASHBOARD.read_text()))
    wanted = {name for _, expr in expressions for name in metric_names(expr)}
    deadline = time.monotonic() + 30
    while True:  # heartbeats carry the node-side figures; poll until the expert counts of the requests arrive
        missing = wanted - _scraped(live.base_url) - ONLY_AFTER_AN_EVENT
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, f"the dashboard reads series a live router does not export: {sorted(missing)}"


def test_status_heatmap_and_watch_from_the_live_router(live, tmp_path):
    deadline = time.monotonic() + 30
    while not httpx.get(live.base_url + "/afd/v1/cluster", timeout=10).json()["expert_load"]:
        assert time.monotonic() < deadline, "no expert counts reached the router"
        time.sleep(0.5)
    view = httpx.get(live.base_url + "/afd/v1/cluster", timeout=10).json()
    assert view["num_experts"] == 16 and set(view["expert_load"]) <= {"ffn-0", "ffn-1"}
    image = tmp_path / "experts.png"
    drawn = CliRunner().invoke(app, ["status", "--router", live.base_url, "--expert-heatmap", str(image)])
    assert drawn.exit_code == 0, drawn.output
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    args = ["status", "--router", live.base_url, "--watch", "--iterations", "2", "--interval", "0.2"]
    watched = CliRunner().invoke(app, args)
    assert watched.exit_code == 0, watched.output
    assert "attn-0" in watched.output and "ffn-1" in watched.output
