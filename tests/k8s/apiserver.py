"""A Kubernetes API emulator (kmock) on 127.0.0.1 in a background thread, for the synchronous official client.

kmock's KubernetesEmulator stores objects and serves create/read/patch/delete/list over HTTP. Two behaviours of
a real API server that afd relies on are added here, nothing more:
- Namespaces (kmock 0.8 cannot parse `/api/v1/namespaces[/NAME]`, so they are served here: create, read, list);
- list honours `labelSelector` (equality terms, which is all afd sends);
- the `/scale` subresource answers with an autoscaling/v1 Scale view of the StatefulSet (the emulator already
  merges a PATCH into the stored object; a real server changes only spec.replicas through it).
The server runs its own event loop in a thread because the kubernetes client blocks; the test thread only
touches the emulator between requests.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import kmock

_NAMESPACE_PATH = re.compile(r"/api/v1/namespaces(?:/([^/]+))?")


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }
    return aiohttp.web.json_response(body, status=code)


class ApiServerEmulator(kmock.KubernetesEmulator):
    namespaces: dict[str, dict[str, Any]]

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        match = _NAMESPACE_PATH.fullmatch(raw_request.path)
        if match is None:
            return await super().__call__(raw_request)
        namespaces = self.__dict__.setdefault("namespaces", {})
        name = match.group(1)
        if raw_request.method == "POST" and name is None:
            body = await raw_request.json()
            name = body["metadata"]["name"]
            if name in namespaces:
                return _status(409, "AlreadyExists", f'namespaces "{name}" already exists')
            namespaces[name] = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name},
                "status": {"phase": "Active"},
            }
            return aiohttp.web.json_response(namespaces[name], status=201)
        if raw_request.method == "GET" and name is None:
            return aiohttp.web.json_response(
                {"apiVersion": "v1", "kind": "NamespaceList", "metadata": {}, "items": list(namespaces.values())}
            )
        if raw_request.method == "GET":
            if name not in namespaces:
                return _status(404, "NotFound", f'namespaces "{name}" not found')
            return aiohttp.web.json_response(namespaces[name])
        return _status(405, "MethodNotAllowed", f"{raw_request.method} on namespaces is not emulated")

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            result["items"] = [
                item for item in result["items"] if _matches((item.get("metadata") or {}).get("labels") or {}, selector)
            ]
        return result

    @staticmethod
    def _scale_view(obj: Any) -> dict[str, Any]:
        meta = obj.get("metadata") or {}
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
            "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 0)},
            "status": {"replicas": (obj.get("status") or {}).get("replicas", 0)},
        }

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        obj = await super()._serve_fetch(request)
        return self._scale_view(obj) if request.subresource == "scale" else obj

    async def _serve_update(self, request: kmock.Request) -> Any:
        obj = await super()._serve_update(request)
        return self._scale_view(obj) if request.subresource == "scale" else obj


@dataclass
class RunningApiServer:
    emulator: ApiServerEmulator
    url: str
    loop: asyncio.AbstractEventLoop
    stopped: asyncio.Event
    thread: threading.Thread

    def requests(self) -> list[kmock.Request]:
        return list(self.emulator)

    def stored(self, group: str, version: str, plural: str, namespace: str) -> dict[str, dict[str, Any]]:
        """Live (not deleted) objects of one resource in a namespace: name -> object."""
        resource = kmock.resource(group, version, plural)
        result = {}
        for (res, ns, name), obj in self.emulator.objects.items():
            if res == resource and ns == namespace and not obj.deleted:
                result[name] = dict(obj.raw)
        return result

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopped.set)
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            raise RuntimeError("the API emulator thread did not stop within 10 s")


def start_api_server(timeout: float = 10.0) -> RunningApiServer:
    started = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        async with ApiServerEmulator() as emulator, kmock.Server(emulator, host="127.0.0.1") as server:
            state.update(
                emulator=emulator,
                url=str(server.url).rstrip("/"),
                loop=asyncio.get_running_loop(),
                stopped=asyncio.Event(),
            )
            started.set()
            await state["stopped"].wait()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as error:  # surfaced by start_api_server, which would otherwise only time out
            state["error"] = error
            started.set()

    thread = threading.Thread(target=run, name="kmock-apiserver", daemon=True)
    thread.start()
    if not started.wait(timeout):
        raise RuntimeError(f"the API emulator did not start within {timeout} s")
    if "error" in state:
        raise RuntimeError("the API emulator failed to start") from state["error"]
    return RunningApiServer(state["emulator"], state["url"], state["loop"], state["stopped"], thread)
