"""--chat-template reaches the router: a real RouterServer (HTTP and gRPC on 127.0.0.1, ephemeral ports) renders
chat with the override file, says so in its log, and the CLI passes the flag through."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import router.server
from afd.builtin_model import builtin_model_dir
from afd.tokenizer import Tokenizer
from orchestration.cli import app
from router.server import RouterConfig, RouterServer

OVERRIDE = "{% for m in messages %}<|user|> {{ m['content'] }} <|user|> {% endfor %}"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return builtin_model_dir(tmp_path_factory.mktemp("cache"))


async def test_router_renders_with_the_override_and_logs_it(model, tmp_path, caplog):
    template = tmp_path / "mine.jinja"
    template.write_text(OVERRIDE)
    server = RouterServer(RouterConfig(model=model, http_port=0, grpc_port=0, chat_template=template))
    with caplog.at_level(logging.INFO, logger="afd.router"):
        try:
            await server.start()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=10) as http:
                response = await http.post("/tokenize", json={"messages": [{"role": "user", "content": "the file"}]})
        finally:
            await server.shutdown()
    tokenizer = Tokenizer.from_pretrained(model)
    user = tokenizer.token_id("<|user|>")
    assert response.json()["tokens"] == [user, *tokenizer.encode("the file"), user]
    assert f"router: chat template: --chat-template {template}" in caplog.messages


def test_afd_node_router_passes_chat_template(monkeypatch, tmp_path, model):
    seen: list[RouterConfig] = []

    async def fake_run_router(config: RouterConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(router.server, "run_router", fake_run_router)
    template = tmp_path / "mine.jinja"
    template.write_text(OVERRIDE)
    args = ["node", "router", "--model", str(model), "--insecure", "--chat-template", str(template)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen[0].chat_template == template


def test_afd_up_refuses_a_missing_template_and_ray(tmp_path):
    def said(result) -> str:  # rich wraps lines at the terminal width
        return " ".join(result.output.split())

    missing = CliRunner().invoke(app, ["up", "--chat-template", str(tmp_path / "nowhere.jinja")])
    assert missing.exit_code == 2 and "no such file" in said(missing)
    template = tmp_path / "mine.jinja"
    template.write_text(OVERRIDE)
    ray = CliRunner().invoke(app, ["up", "--ray", "--chat-template", str(template)])
    assert ray.exit_code == 2 and "not passed to Ray actors" in said(ray)
