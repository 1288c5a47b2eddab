"""The model host, without an editor: discovery, permissions, refusal, the load error,
idling out. Hosts run the instant backend (the shipped model's tokenizer only)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from exlsp.completion.backends.base import BackendUnavailable, GenerationJob
from exlsp.completion.backends.instant import InstantBackend
from exlsp.completion.builtin_model import SHIPPED_MODEL_DIR
from exlsp.completion.config import ModelConfig
from exlsp.completion.host import control, rendezvous
from exlsp.completion.host.client import HostWorker, ModelHostLoadError
from exlsp.completion.host.server import ModelHost
from exlsp.server.doctor import DoctorReport


def instant(**changes: object) -> ModelConfig:
    return ModelConfig(backend="instant", path=str(SHIPPED_MODEL_DIR), device="cpu", **changes)  # type: ignore[arg-type]


async def run_job(worker: HostWorker, prompt: list[int]) -> GenerationJob:
    job = GenerationJob(prompt=prompt, stop_ids=frozenset(), max_tokens=4)
    handle = worker.submit(job)
    async for _ in handle.tokens():
        pass
    return job


async def test_two_servers_starting_together_share_one_host(host_runtime: Path) -> None:
    a, b = HostWorker(instant()), HostWorker(instant())
    await asyncio.gather(a.load(), b.load())
    try:
        assert a.host_pid is not None and a.host_pid == b.host_pid
        hosts = control.running_hosts()
        assert [h["pid"] for h in hosts] == [a.host_pid]
        assert hosts[0]["loads"] == 1
        assert len(hosts[0]["sessions"]) == 2
        job = await run_job(a, a.backend.tokenizer.encode("def f():"))  # type: ignore[union-attr]
        assert job.stats.stop_reason == "eos" and job.stats.prompt_tokens > 0
    finally:
        a.close()
        b.close()


async def test_socket_0600_in_a_0700_folder(host_runtime: Path) -> None:
    worker = HostWorker(instant())
    await worker.load()
    try:
        sock = worker.paths.socket
        assert sock.parent == host_runtime
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(host_runtime).st_mode) == 0o700
    finally:
        worker.close()


def test_a_loose_runtime_folder_is_tightened(host_runtime: Path) -> None:
    host_runtime.mkdir(mode=0o755)
    os.chmod(host_runtime, 0o755)
    assert rendezvous.runtime_dir() == host_runtime
    assert stat.S_IMODE(os.lstat(host_runtime).st_mode) == 0o700


async def test_another_configuration_gets_another_host(host_runtime: Path) -> None:
    a, b = HostWorker(instant(threads=1)), HostWorker(instant(threads=2))
    await a.load()
    await b.load()
    try:
        assert a.paths.socket != b.paths.socket
        assert a.host_pid != b.host_pid
        assert sorted(h["pid"] for h in control.running_hosts()) == sorted([a.host_pid, b.host_pid])
        # What is not loaded does not matter: the same host.
        c = HostWorker(instant(threads=1, hostIdleMinutes=3, fimTemplate="starcoder2"))
        assert c.paths.socket == a.paths.socket
    finally:
        a.close()
        b.close()


async def test_a_connection_of_another_user_is_refused(
    host_runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = instant()
    paths = rendezvous.HostPaths.for_model(model)
    host = ModelHost(model, paths.socket, create=lambda m: InstantBackend(Path(m.path)))
    serving = asyncio.get_running_loop().create_task(host.serve())
    try:
        while not paths.socket.exists():
            await asyncio.sleep(0.01)
        # The same user is served.
        same = HostWorker(model)
        await same.load()
        same.close()
        # The peer-credential check sees another uid.
        monkeypatch.setattr(rendezvous, "peer_uid", lambda sock: os.getuid() + 1)
        other = HostWorker(model)
        with pytest.raises(ModelHostLoadError, match="refused"):
            await other.load()
        other.close()
    finally:
        host.stop()
        await serving


async def test_a_load_error_reaches_every_connected_server_once(host_runtime: Path) -> None:
    model = instant()
    paths = rendezvous.HostPaths.for_model(model)
    both_connected = threading.Event()

    def out_of_memory(m: ModelConfig) -> InstantBackend:
        both_connected.wait(10)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    host = ModelHost(model, paths.socket, create=out_of_memory)
    serving = asyncio.get_running_loop().create_task(host.serve())
    while not paths.socket.exists():
        await asyncio.sleep(0.01)
    a, b = HostWorker(model), HostWorker(model)
    notices: list[str] = []
    a.on_notice = b.on_notice = notices.append
    loads = [asyncio.ensure_future(a.load()), asyncio.ensure_future(b.load())]
    while len(host.clients) < 2:
        await asyncio.sleep(0.01)
    both_connected.set()
    results = await asyncio.wait_for(asyncio.gather(*loads, return_exceptions=True), 20)
    assert all(isinstance(r, ModelHostLoadError) for r in results), results
    assert all("out of memory" in str(r) for r in results)
    assert notices == []  # the service reports the load error; nothing else is shown
    await asyncio.wait_for(serving, 10)  # a host that could not load exits
    assert not paths.socket.exists()
    a.close()
    b.close()


async def test_the_host_exits_when_idle(host_runtime: Path) -> None:
    model = instant()
    paths = rendezvous.HostPaths.for_model(model)
    host = ModelHost(model, paths.socket, idle_s=0.3, create=lambda m: InstantBackend(Path(m.path)))
    serving = asyncio.get_running_loop().create_task(host.serve())
    while not paths.socket.exists():
        await asyncio.sleep(0.01)
    worker = HostWorker(model)
    await worker.load()
    await asyncio.sleep(0.6)
    assert not serving.done()  # a connected server keeps it
    worker.close()
    await asyncio.wait_for(serving, 10)
    assert not paths.socket.exists()


async def test_a_hung_host_does_not_hold_a_request_past_its_deadline(host_runtime: Path) -> None:
    worker = HostWorker(instant())
    await worker.load()
    assert worker.host_pid is not None
    os.kill(worker.host_pid, signal.SIGSTOP)
    try:
        job = GenerationJob(
            prompt=[1, 2, 3], stop_ids=frozenset(), max_tokens=4, deadline=time.monotonic() + 0.2
        )
        handle = worker.submit(job)
        with pytest.raises(BackendUnavailable, match="does not answer"):
            await asyncio.wait_for(handle.done, 30)
        assert job.stats.stop_reason == "deadline"
    finally:
        os.kill(worker.host_pid, signal.SIGCONT)
        worker.close()


async def test_status_and_doctor_name_each_host(
    host_runtime: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from exlsp.server.cli import main as cli
    from exlsp.server.doctor import _host_rows

    a, b = HostWorker(instant(threads=1)), HostWorker(instant(threads=2))
    await a.load()
    await b.load()
    try:
        assert cli(["host", "status"]) == 0
        out = capsys.readouterr().out
        assert f"pid {a.host_pid}" in out and f"pid {b.host_pid}" in out
        assert "2 hosts: each model configuration has its own" in out
        report = DoctorReport()
        await asyncio.to_thread(_host_rows, report, instant(threads=1))
        rows = dict(report.rows)
        assert rows["host"].startswith(f"pid {a.host_pid}, ready")
        assert "RSS" in rows["host memory"]
        assert f"pid {os.getpid()}" in rows["host sessions"]
        assert f"pid {b.host_pid}" in rows["other hosts"]
    finally:
        a.close()
        b.close()
    assert await asyncio.to_thread(cli, ["host", "stop", "--all"]) == 0
    assert "stopped the model host(s)" in capsys.readouterr().out


def test_the_transformers_backend_keeps_at_most_host_slots_caches(tiny_model: Path) -> None:
    from exlsp.completion.backends.transformers_backend import TransformersBackend
    from exlsp.completion.decode import decode

    backend = TransformersBackend(
        ModelConfig(path=str(tiny_model), device="cpu", hostSlots=2), tiny_model
    )
    prompt = list(range(10, 60))

    def run(slot: str) -> GenerationJob:
        job = GenerationJob(prompt=prompt, stop_ids=frozenset(), max_tokens=2, slot=slot)
        list(decode(backend, job))
        return job

    run("a/main")
    run("b/main")
    assert run("a/main").stats.prefilled_tokens == 1  # both kept
    run("c/main")  # b is the least recently used: dropped
    slots = backend.slot_bytes()
    assert sorted(slots) == ["a/main", "c/main"]
    assert all(n > 0 for n in slots.values())
    assert run("b/main").stats.prefilled_tokens == len(prompt)
    assert run("c/main").stats.prefilled_tokens == 1
    backend.close()


def test_two_callers_at_the_same_moment_start_one_host(host_runtime: Path) -> None:
    """The lock beside the socket: of two servers that find no host at the same moment,
    one starts it and the other connects to it."""
    model = instant()
    paths = rendezvous.HostPaths.for_model(model)
    paths.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    barrier = threading.Barrier(2)

    def start() -> bool:
        barrier.wait()
        return rendezvous.ensure_host(model, paths)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = sorted(pool.map(lambda _: start(), range(2)))
    assert started == [False, True]
    assert len(control.running_hosts()) == 1
