"""`afd up --ray` end to end: router + attention + FFN nodes as Ray actors on a local 2-CPU Ray instance.

The launcher starts the Ray instance itself (as `afd up --ray` without an address does), every actor on
127.0.0.1 with ephemeral ports; the test checks the OpenAI API gives the in-process engine's greedy text,
scales the FFN pool 2 -> 3 live, and that stop() leaves no actor and no Ray process behind.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import openai
import pytest

from afd.builtin_model import builtin_model_dir
from afd.errors import AfdError, ConfigError
from orchestration.local_cluster import LocalClusterConfig
from tests.engines import greedy_reference_texts

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'afd[ray]')")

from orchestration.ray_cluster import RayCluster, RayOptions  # noqa: E402  (needs ray)

pytestmark = pytest.mark.slow

PROMPTS = ["the file object is used to read", "return a new list of values"]
NEW_TOKENS = 16


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc), zombies excluded."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return builtin_model_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def expected(model: Path) -> dict[str, str]:
    """Greedy completions of PROMPTS from the single-process engine."""
    return greedy_reference_texts(model, PROMPTS, NEW_TOKENS)


def _complete(client: openai.OpenAI, prompt: str, stream: bool = False) -> str:
    kwargs = {
        "model": client.models.list().data[0].id,
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0.0,
        "extra_body": {"ignore_eos": True},
    }
    if not stream:
        return client.completions.create(**kwargs).choices[0].text
    return "".join(chunk.choices[0].text for chunk in client.completions.create(stream=True, **kwargs) if chunk.choices)


@pytest.mark.timeout(240)
def test_ray_actors_serve_scale_and_stop_cleanly(model: Path, expected: dict[str, str]) -> None:
    if ray.is_initialized():
        pytest.skip("another test left Ray initialized in this process")
    processes_before = _descendants(os.getpid())
    config = LocalClusterConfig(model=model, http_port=0, threads_per_node=1, start_timeout_s=120)
    cluster = RayCluster(config, options=RayOptions(local_num_cpus=2))
    try:
        try:
            cluster.connect()
        except Exception as exc:
            pytest.skip(f"a local Ray instance cannot start here: {exc}")
        assert ray.cluster_resources()["CPU"] == 2
        cluster.start()

        token = cluster.workdir / "cluster-token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) >= 32

        # Every node is an actor in its own process, placed in its pool's placement group.
        assert cluster.router is not None and cluster.router.info is not None
        infos = {node_id: node.info for node_id, node in cluster.nodes.items()}
        assert sorted(infos) == ["attn-0", "ffn-0", "ffn-1"]
        pids = {cluster.router.info["pid"], *(info["pid"] for info in infos.values())}
        assert len(pids) == 4 and os.getpid() not in pids and all(_alive(pid) for pid in pids)
        groups = {g["name"]: g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"}
        assert {tuple(name.rsplit("-", 2)[1:]) for name in groups} == {("router", "0"), ("attn", "0"), ("ffn", "0")}
        by_pool = {name.rsplit("-", 2)[1]: group for name, group in groups.items()}
        assert by_pool["router"]["strategy"] == "PACK" and len(by_pool["router"]["bundles"]) == 1
        assert by_pool["attn"]["strategy"] == "SPREAD" and len(by_pool["attn"]["bundles"]) == 1
        assert by_pool["ffn"]["strategy"] == "SPREAD" and len(by_pool["ffn"]["bundles"]) == 2
        assert all(bundle == {"CPU": 0.25} for g in groups.values() for bundle in g["bundles"].values())
        for info in [cluster.router.info, *infos.values()]:  # pools are named after their role here
            assert info["placement_group"] == by_pool[info["role"]]["placement_group_id"], info
            assert info["resources"] == {"CPU": 0.25}

        client = openai.OpenAI(base_url=cluster.api_url, api_key="unused", max_retries=0, timeout=60)
        assert _complete(client, PROMPTS[0]) == expected[PROMPTS[0]]
        assert _complete(client, PROMPTS[1], stream=True) == expected[PROMPTS[1]]

        with pytest.raises(ConfigError, match="at least one node"):
            cluster.scale(ffn=0)
        # Scale 2 -> 3 while requests run: none fails, every one gets the reference text.
        results: list[tuple[str, str]] = []
        failures: list[str] = []
        scaled = threading.Event()

        def load() -> None:
            i = 0
            while not scaled.is_set() or len(results) < 2:
                prompt = PROMPTS[i % len(PROMPTS)]
                try:
                    results.append((prompt, _complete(client, prompt, stream=True)))
                except Exception as exc:  # asserted on below
                    failures.append(f"{type(exc).__name__}: {exc}")
                    return
                i += 1

        loader = threading.Thread(target=load)
        loader.start()
        try:
            cluster.scale(ffn=3)
        finally:
            scaled.set()
            loader.join(60)
        assert not loader.is_alive() and failures == []
        assert results and all(text == expected[prompt] for prompt, text in results)
        view = cluster.cluster()
        ffn = [n for n in view["nodes"] if n["role"] == "ffn" and n["state"] == "ready"]
        assert sorted(n["node_id"] for n in ffn) == ["ffn-0", "ffn-1", "ffn-2"]
        assert all(n["experts"] for n in ffn)
        assert sorted(e for n in ffn for e in n["experts"]) == list(range(16))
        assert cluster.nodes["ffn-2"].info is not None
        pids.add(cluster.nodes["ffn-2"].info["pid"])
        assert _complete(client, PROMPTS[0]) == expected[PROMPTS[0]]
    finally:
        cluster.stop(timeout=20)
        stopped_ray = not ray.is_initialized()
        cluster.remove_workdir()
        ray.shutdown()  # a no-op when stop() shut down the instance it started, as it should have
    assert stopped_ray, "stop() must shut down the local Ray instance it started"
    assert cluster.nodes == {} and cluster.router is None
    _wait_for(lambda: not any(_alive(pid) for pid in pids), 15, "the node actors' processes to exit")
    _wait_for(lambda: not (_descendants(os.getpid()) - processes_before), 20, "Ray's processes to exit")
    cluster.stop()  # idempotent


@pytest.mark.timeout(180)
def test_pool_resources_place_each_node_on_its_pool(model: Path, expected: dict[str, str]) -> None:
    """A Ray cluster advertising the KubeRay overlay's resources (here all on one machine): every node takes
    a unit of its pool's resource, FFN nodes spread over the two FFN pools, and a pool with no unit left
    refuses to grow with a clear error."""
    if ray.is_initialized():
        pytest.skip("another test left Ray initialized in this process")
    pools = {"afd_router": 1, "afd_pool_attn": 1, "afd_pool_big_ffn": 1, "afd_pool_small_ffn": 1}
    try:
        ray.init(num_cpus=2, resources=pools, include_dashboard=False, log_to_driver=False)
    except Exception as exc:
        pytest.skip(f"a local Ray instance cannot start here: {exc}")
    config = LocalClusterConfig(model=model, http_port=0, threads_per_node=1, start_timeout_s=120)
    cluster = RayCluster(config)  # joins the Ray instance this test started
    try:
        cluster.start()
        assert cluster.router is not None and cluster.router.info is not None
        assert cluster.router.info["resources"] == {"afd_router": 1.0, "CPU": 0.5}  # 2 CPUs / 4 afd units
        placed = {node_id: (node.pool, node.info["resources"]) for node_id, node in cluster.nodes.items() if node.info}
        assert placed == {
            "attn-0": ("attn", {"afd_pool_attn": 1.0, "CPU": 0.5}),
            "ffn-0": ("big_ffn", {"afd_pool_big_ffn": 1.0, "CPU": 0.5}),
            "ffn-1": ("small_ffn", {"afd_pool_small_ffn": 1.0, "CPU": 0.5}),
        }
        client = openai.OpenAI(base_url=cluster.api_url, api_key="unused", max_retries=0, timeout=60)
        assert _complete(client, PROMPTS[0]) == expected[PROMPTS[0]]
        with pytest.raises(ConfigError, match="no room for another ffn node"):
            cluster.scale(ffn=3)
        assert sorted(cluster.nodes) == ["attn-0", "ffn-0", "ffn-1"]
        cluster.stop(timeout=20)
        assert ray.is_initialized(), "stop() must leave a Ray instance it did not start running"
        assert all(group["state"] == "REMOVED" for group in ray.util.placement_group_table().values())

        # A node that cannot start is reported with its own error, and nothing of it stays reserved.
        broken = RayCluster(LocalClusterConfig(model=model / "missing", http_port=0, start_timeout_s=60))
        with pytest.raises(AfdError, match=r"router failed to start: ConfigError: no config\.json"):
            broken.start()
        broken.stop()
        broken.remove_workdir()
        assert all(group["state"] == "REMOVED" for group in ray.util.placement_group_table().values())
    finally:
        cluster.stop(timeout=20)
        cluster.remove_workdir()
        ray.shutdown()
