"""Test hosts that share nothing but a network: Linux network namespaces on one bridge.

Each host is a network namespace with its own loopback and one veth interface on a bridge in the
test's own namespace, which holds the bridge's address (.1) and so reaches every host; hosts reach
each other through the bridge. A process started on a host sees only that host's interfaces: the
machine's own 127.0.0.1 services are out of its reach. Needs root and iproute2 (`ip netns`).

`NetworkHosts` is a context manager: leaving it stops every process it started (process group by
process group), checks that no process is left in any namespace, deletes the namespaces and the
bridge, and records what it removed in `cleanup` so a test can assert that nothing remains.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

STOP_TIMEOUT_S = 30.0


def available() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@dataclass
class Host:
    name: str
    namespace: str
    address: str

    def url(self, port: int) -> str:
        return f"http://{self.address}:{port}"


@dataclass
class Cleanup:
    """What leaving NetworkHosts found and removed: the processes each namespace still held after
    its processes were stopped (must be empty), the namespaces and links deleted."""

    leftover_pids: dict[str, list[int]] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)


class NetworkHosts:
    """Hosts on one bridge in a /24 of 10.231.0.0/16 that no interface of this machine uses."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.bridge = f"tfb{self.tag}"
        self.subnet = _free_subnet()
        self.gateway = f"{self.subnet}.1"
        self.hosts: dict[str, Host] = {}
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.cleanup = Cleanup()

    def __enter__(self) -> NetworkHosts:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, name: str) -> Host:
        """A new host: its namespace, loopback up, and eth0 at the next address of the subnet."""
        index = len(self.hosts) + 2
        namespace, veth = f"tf-{self.tag}-{name}", f"tfv{self.tag}{index}"
        _ip("netns", "add", namespace)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("link", "set", veth, "master", self.bridge, "up")
        address = f"{self.subnet}.{index}"
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        host = self.hosts[name] = Host(name, namespace, address)
        return host

    def spawn(self, host: Host, cmd: list[str], *, env: dict[str, str], log: Path, cwd: Path | None = None,
              user: str | None = None) -> subprocess.Popen:
        """Run cmd on host (as `user` when given), in a process group of its own, output to log."""
        prefix = ["ip", "netns", "exec", host.namespace]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        proc = subprocess.Popen([*prefix, *cmd], env=env, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((host.name, proc))
        return proc

    def run(self, host: Host, cmd: list[str], *, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run cmd on host to completion; its exit code and output are the caller's to check."""
        return subprocess.run(["ip", "netns", "exec", host.namespace, *cmd], env=env, capture_output=True, text=True,
                              timeout=timeout)

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        """Stop proc's whole process group: sig, then SIGKILL after STOP_TIMEOUT_S."""
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what the leader left in its group (pool children)
        except ProcessLookupError:
            pass
        proc.wait()

    def close(self) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc)
        for host in self.hosts.values():
            left = [int(p) for p in _ip("netns", "pids", host.namespace).split()]
            self.cleanup.leftover_pids[host.name] = left
            for pid in left:  # recorded for the test to fail on; killed so the namespace can go
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", host.namespace)
            self.cleanup.namespaces.append(host.namespace)
        _ip("link", "del", self.bridge)
        self.cleanup.links.append(self.bridge)
        self.hosts.clear()


def namespaces() -> list[str]:
    """The names of this machine's network namespaces."""
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def links() -> list[str]:
    """The names of this machine's network interfaces in the current namespace."""
    return [line.split(":")[1].strip().split("@")[0] for line in _ip("-o", "link", "show").splitlines()]


def _free_subnet() -> str:
    used = _ip("-o", "-4", "addr", "show")
    for _ in range(64):
        subnet = f"10.231.{secrets.randbelow(256)}"
        if f" {subnet}." not in used:
            return subnet
    raise RuntimeError("no free /24 in 10.231.0.0/16")
