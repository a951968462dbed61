"""A small network of "hosts" on one machine: network namespaces on a bridge.

::

    root namespace (the test)
      brk<sfx>  10.77.X.1/24  ── vb<sfx>0 ═══ vh<sfx>0   namespace brkh<sfx>-0  10.77.X.10  redis
                              ── vb<sfx>1 ═══ vh<sfx>1   namespace brkh<sfx>-1  10.77.X.11  "host1"
                              ── vb<sfx>2 ═══ vh<sfx>2   namespace brkh<sfx>-2  10.77.X.12  "host2"
                              ── vb<sfx>3 ═══ vh<sfx>3   namespace brkh<sfx>-3  10.77.X.13  "host3"

Every host, the server's included, reaches the others over its own veth link and the bridge; the
test itself talks to the server from the root namespace through the bridge's address. ``X`` and
``<sfx>`` are random (checked against what exists), so parallel or leftover runs do not clash;
interface names stay well under the kernel's 15 characters.

Processes run in a host with ``ip netns exec`` plus ``unshare --uts`` and ``hostname hostN``, so
each host also has its own host name (the worker runtime names consumers and heartbeats after
it). Both exec the command: the PID we hold is the process itself. :meth:`HostProcess.kill`
SIGKILLs a process with all its descendants (a worker's supervisor and its slots), like a
machine that dies.

Cutting a host (:meth:`Network.cut`) sets the *root-side* veth down: the bridge port is
disabled and the host side loses carrier, so every packet either way is dropped silently. TCP
connections stall (nobody sends a RST or an ICMP error) and resume by retransmission when the
link comes back, as on a real network partition. Setting the host-side end down would instead
remove the host's routes, making its new connections fail at once with ENETUNREACH.

Where bridged traffic goes through iptables (``net.bridge.bridge-nf-call-iptables=1``), the
bridge's frames pass the ``FORWARD`` chain, whose policy Docker sets to ``DROP``: the hosts
could not reach each other. :meth:`Network.build` then inserts one ``ACCEPT`` rule for this
bridge's own traffic (``-i brk<sfx> -o brk<sfx>``, commented ``broker-multihost brk<sfx>``) and
:meth:`Network.teardown` deletes it, even when a test failed; rules left by a run that was
killed are deleted by the next one (their bridge is gone).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker import EmbeddedServer

ROOT = Path(__file__).resolve().parents[2]


class NetworkError(RuntimeError):
    """The network could not be built (typically: not root, or no ``ip netns``)."""


def _ip(*args: str, timeout: float = 10.0) -> str:
    try:
        done = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise NetworkError("the `ip` command (iproute2) is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetworkError(f"`ip {' '.join(args)}` did not return in {timeout}s") from exc
    if done.returncode != 0:
        raise NetworkError(
            f"`ip {' '.join(args)}` failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()}"
        )
    return done.stdout


BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
RULE_TAG = "broker-multihost"


def _bridge_filtered() -> bool:
    """Whether bridged frames traverse iptables (``br_netfilter`` with its switch on)."""
    try:
        return BRIDGE_NF.read_text().strip() == "1"
    except OSError:
        return False


def _iptables(*args: str, timeout: float = 10.0) -> str:
    try:
        done = subprocess.run(
            ["iptables", "-w", "5", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise NetworkError("the `iptables` command is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetworkError(f"`iptables {' '.join(args)}` did not return in {timeout}s") from exc
    if done.returncode != 0:
        raise NetworkError(
            f"`iptables {' '.join(args)}` failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()}"
        )
    return done.stdout


def forward_rule(bridge: str) -> list[str]:
    """The ``FORWARD`` rule (without ``-I``/``-D``) that lets ``bridge``'s own traffic through."""
    return [
        "FORWARD", "-i", bridge, "-o", bridge,
        "-m", "comment", "--comment", f"{RULE_TAG} {bridge}", "-j", "ACCEPT",
    ]  # fmt: skip


def forward_policy() -> str | None:
    """The ``FORWARD`` chain's policy (``ACCEPT``, ``DROP``), or None when it cannot be read."""
    try:
        rules = _iptables("-S", "FORWARD")
    except NetworkError:
        return None
    for line in rules.splitlines():
        parts = line.split()
        if parts[:2] == ["-P", "FORWARD"] and len(parts) > 2:
            return parts[2]
    return None


def _remove_stale_forward_rules() -> None:
    """Delete the rules of earlier runs whose bridge no longer exists (a killed run)."""
    links = _ip("-o", "link", "show")
    for line in _iptables("-S", "FORWARD").splitlines():
        if f'"{RULE_TAG} ' not in line:
            continue
        bridge = line.split(f'"{RULE_TAG} ', 1)[1].split('"', 1)[0]
        if f" {bridge}:" not in links:
            with contextlib.suppress(NetworkError):
                _iptables("-D", *forward_rule(bridge))


@dataclass
class Host:
    index: int
    netns: str
    ip: str
    veth_root: str  # the bridge port, in the root namespace
    veth_host: str  # inside the namespace

    @property
    def hostname(self) -> str:
        """The host name its processes see (their own UTS namespace)."""
        return f"host{self.index}"

    def __str__(self) -> str:
        return f"{self.hostname}({self.netns} {self.ip})"

    def argv(self, command: list[str]) -> list[str]:
        """``command`` run inside this host: its network namespace and its host name."""
        return [
            "ip", "netns", "exec", self.netns, "unshare", "--uts", "--",
            "sh", "-c", 'hostname "$0" && exec "$@"', self.hostname, *command,
        ]  # fmt: skip


class NamespacedServer(EmbeddedServer):
    """A private ``redis-server`` inside ``host``'s namespace, bound to its address only."""

    def __init__(self, host: Host, **kwargs: object) -> None:
        super().__init__(bind=host.ip, **kwargs)  # type: ignore[arg-type]
        self.host = host

    def _argv(self) -> list[str]:
        # `ip netns exec` execs redis-server: the PID held (and signalled) is the server's
        return ["ip", "netns", "exec", self.host.netns, *super()._argv()]


def broker_cli() -> list[str]:
    """The ``broker`` console script of this interpreter's environment (else ``-m broker.cli``)."""
    script = Path(sys.executable).with_name("broker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


def _children(pid: int) -> list[int]:
    """The PIDs whose parent is ``pid`` (from ``/proc``)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@dataclass
class HostProcess:
    """A process started in a host; stdout and stderr go to files (no pipe can fill up)."""

    host: Host
    tag: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def describe(self, tail: int = 1500) -> str:
        return (
            f"{self.tag} on {self.host} pid {self.pid} exit {self.proc.poll()}\n"
            f"  stdout: {self.stdout()[-tail:]!r}\n  stderr: {self.stderr()[-tail:]!r}"
        )

    def kill(self) -> None:
        """SIGKILL the process and every descendant (a worker's supervisor and its slots,
        which run in process groups of their own), as when a machine dies, and reap it.

        The tree is frozen first (SIGSTOP, parents before children), so that nothing in it
        reacts while it is killed: a supervisor restarting a slot, or a slot receiving its
        parent-death SIGTERM and stopping gracefully.
        """
        if self.proc.poll() is not None:
            return  # reaped: its PID may belong to someone else by now
        frozen: list[int] = []
        todo = [self.pid]
        while todo:
            pid = todo.pop()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)
                todo += _children(pid)
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # anything left in its own group; not reaped yet, so the group id is still ours
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process only (a supervisor forwards it to its slots)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


@dataclass
class Network:
    n_hosts: int = 3
    suffix: str = field(default_factory=lambda: secrets.token_hex(2))
    prefix: str = ""
    hosts: list[Host] = field(default_factory=list)
    #: the server's own namespace ("host0")
    server_host: Host | None = None
    server: EmbeddedServer | None = None
    processes: list[HostProcess] = field(default_factory=list)
    _created_netns: list[str] = field(default_factory=list)
    _created_links: list[str] = field(default_factory=list)
    #: FORWARD rules inserted for the bridge (deleted by teardown)
    _forward_rules: list[list[str]] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"brk{self.suffix}"

    @property
    def gateway(self) -> str:
        return f"{self.prefix}.1"

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    # -- building -----------------------------------------------------------------------------

    def build(self) -> Network:
        """Create namespaces, bridge, veths; start the server; check every host reaches it.

        :raises NetworkError: with the reason; whatever was created is removed again.
        """
        if os.geteuid() != 0:
            raise NetworkError(
                f"the multihost tests need root to create network namespaces (running as uid "
                f"{os.geteuid()}); run them as root (CI does) or deselect with -m 'not multihost'"
            )
        if shutil.which("ip") is None:
            raise NetworkError("the `ip` command (iproute2) is not installed")
        try:
            # one run at a time picks names and a subnet and creates them (parallel runs)
            with open(Path(tempfile.gettempdir(), "broker-multihost.lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._pick_names()
                self._build()
            assert self.server_host is not None
            self.server = NamespacedServer(self.server_host)
            self.server.start()  # its PING comes from the root namespace, over the bridge
            for host in self.hosts:
                self._check_reach(host)
        except BaseException:
            self.teardown()
            raise
        return self

    def _pick_names(self) -> None:
        links = _ip("-o", "link", "show")
        netns = _ip("netns", "list")
        while f"brk{self.suffix}" in links or f"brkh{self.suffix}-" in netns:
            self.suffix = secrets.token_hex(2)
        used = _ip("-4", "-o", "addr", "show") + _ip("-4", "route", "show", "table", "all")
        free = [x for x in range(256) if f"10.77.{x}." not in used]
        if not free:
            raise NetworkError("no free 10.77.X.0/24 subnet on this machine")
        # 0 first (the documented layout), a random free one when it is taken
        self.prefix = f"10.77.{0 if 0 in free else random.choice(free)}"
        every = [
            Host(
                index=i,
                netns=f"brkh{self.suffix}-{i}",
                ip=f"{self.prefix}.{10 + i}",
                veth_root=f"vb{self.suffix}{i}",
                veth_host=f"vh{self.suffix}{i}",
            )
            for i in range(self.n_hosts + 1)
        ]
        self.server_host, self.hosts = every[0], every[1:]

    def _build(self) -> None:
        assert self.server_host is not None
        every = [self.server_host, *self.hosts]
        first = every[0].netns
        try:
            _ip("netns", "add", first)
        except NetworkError as exc:
            raise NetworkError(
                f"cannot create a network namespace ({exc}); the multihost tests need root "
                f"and a kernel that allows `ip netns add` (CI runs them as root)"
            ) from exc
        self._created_netns.append(first)
        for host in every[1:]:
            _ip("netns", "add", host.netns)
            self._created_netns.append(host.netns)
        _ip("link", "add", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self._created_links.append(self.bridge)
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self._allow_forwarding()
        for host in every:
            _ip(
                "link", "add", host.veth_root, "type", "veth",
                "peer", "name", host.veth_host, "netns", host.netns,
            )  # fmt: skip
            self._created_links.append(host.veth_root)
            _ip("link", "set", host.veth_root, "master", self.bridge)
            _ip("link", "set", host.veth_root, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", host.veth_host)
            _ip("-n", host.netns, "link", "set", host.veth_host, "up")

    def _allow_forwarding(self) -> None:
        """Where bridged frames pass iptables, let this bridge's own traffic through the
        ``FORWARD`` chain whatever its policy (Docker sets ``DROP``); teardown deletes it."""
        if not _bridge_filtered() or shutil.which("iptables") is None:
            return
        _remove_stale_forward_rules()
        rule = forward_rule(self.bridge)
        _iptables("-I", rule[0], "1", *rule[1:])
        self._forward_rules.append(rule)

    def _forward_note(self) -> str:
        """Why bridged traffic may be dropped here, in a few words (or "")."""
        if not _bridge_filtered():
            return ""
        if shutil.which("iptables") is None:
            return (
                "; bridged traffic passes iptables' FORWARD chain here (bridge-nf-call-iptables=1)"
                " and there is no `iptables` command to let the test bridge through (Docker "
                "sets the chain's policy to DROP)"
            )
        allowed = "an ACCEPT rule for it was inserted" if self._forward_rules else "no rule for it"
        return (
            f"; bridged traffic passes iptables' FORWARD chain (bridge-nf-call-iptables=1, "
            f"policy {forward_policy() or 'unknown'}), {allowed}"
        )

    def _check_reach(self, host: Host, timeout: float = 15.0) -> None:
        """From inside ``host``: a TCP connection to the server that answers PING, and the
        host name its processes see."""
        assert self.server is not None
        probe = (
            "import socket,sys,time\n"
            "end=time.monotonic()+float(sys.argv[3])\n"
            "while True:\n"
            "  try:\n"
            "    s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1)\n"
            "    s.sendall(b'PING\\r\\n'); r=s.recv(16); s.close()\n"
            "    if r.startswith(b'+PONG'): print('ok', socket.gethostname()); break\n"
            "  except OSError as e:\n"
            "    if time.monotonic()>end: sys.exit(f'unreachable: {e}')\n"
            "    time.sleep(0.05)\n"
        )
        argv = host.argv([sys.executable, "-c", probe])
        argv += [self.server.bind, str(self.server.port), str(timeout)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10)
        if done.returncode != 0 or "ok" not in done.stdout:
            raise NetworkError(
                f"{host} cannot reach the server at {self.server.bind}:{self.server.port}: "
                f"{(done.stderr or done.stdout).strip()}{self._forward_note()}"
            )
        if done.stdout.split() != ["ok", host.hostname]:
            raise NetworkError(f"{host}: processes there see {done.stdout.strip()!r}")

    # -- using --------------------------------------------------------------------------------

    def spawn(
        self, host: Host, module: str, args: list[str], log_dir: Path, tag: str
    ) -> HostProcess:
        """``python -m <module> <args>`` inside ``host``, with cwd at the repository root."""
        return self.run_in(host, [sys.executable, "-m", module, *args], log_dir, tag)

    def run_in(
        self,
        host: Host,
        command: list[str],
        log_dir: Path,
        tag: str,
        env: dict[str, str] | None = None,
    ) -> HostProcess:
        """Start ``command`` inside ``host`` (cwd: the repository root, which is also on
        ``PYTHONPATH`` so handlers in ``tests.helpers`` import; ``env`` is added to ours), in
        a process group of its own."""
        out, err = log_dir / f"{tag}.out", log_dir / f"{tag}.err"
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(
                host.argv(command),
                cwd=ROOT,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
                start_new_session=True,
            )
        hp = HostProcess(host, tag, proc, out, err)
        self.processes.append(hp)
        return hp

    def run_cli(
        self, host: Host, args: list[str], *, env: dict[str, str] | None = None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run ``broker <args>`` inside ``host`` to completion (at most ``timeout`` s)."""
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = str(ROOT)
        return subprocess.run(
            host.argv([*broker_cli(), *args]),
            cwd=ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cut(self, host: Host) -> None:
        """Partition ``host``: its packets (and the server's to it) are dropped silently."""
        _ip("link", "set", host.veth_root, "down")

    def restore(self, host: Host) -> None:
        _ip("link", "set", host.veth_root, "up")

    # -- teardown -----------------------------------------------------------------------------

    def teardown(self) -> None:
        """Kill every process started here (by PID), stop the server, delete links,
        namespaces and the FORWARD rule. Tries every step; raises at the end if something
        could not be removed."""
        problems: list[str] = []
        for hp in self.processes:
            try:
                hp.kill()
            except Exception as exc:  # go on with the rest
                problems.append(f"kill {hp.tag} pid {hp.pid}: {exc!r}")
        if self.server is not None:
            try:
                self.server.close()
            except Exception as exc:
                problems.append(f"stop redis-server: {exc!r}")
            self.server = None
        for ns in reversed(self._created_netns):
            try:
                _ip("netns", "del", ns)
            except NetworkError as exc:
                problems.append(str(exc))
        self._created_netns.clear()
        # deleting a namespace deletes its veth ends and so their peers; the bridge stays
        deadline = time.monotonic() + 5
        for link in reversed(self._created_links):
            while True:
                try:
                    _ip("link", "show", link)
                except NetworkError:
                    break  # gone
                try:
                    _ip("link", "del", link)
                    break
                except NetworkError as exc:
                    if time.monotonic() > deadline:
                        problems.append(str(exc))
                        break
                    time.sleep(0.05)
        self._created_links.clear()
        for rule in self._forward_rules:
            try:
                _iptables("-D", *rule)
            except NetworkError as exc:
                problems.append(str(exc))
        self._forward_rules.clear()
        if problems:
            raise NetworkError("multihost teardown left things behind: " + "; ".join(problems))
