"""A throw-away single-node Slurm cluster on localhost, for tests.

`LocalSlurmCluster` writes a minimal ``slurm.conf`` into a private directory and starts a private
``munged`` (as the ``munge`` user, with its own key and socket), ``slurmctld`` and ``slurmd`` (as
root, in the foreground, so the test owns their pids). Nothing outside that directory is touched:
the ports are picked free, the config is found through ``SLURM_CONF`` and the munge socket through
``AuthInfo``, so a system Slurm or munge on the same machine is left alone. `stop()` terminates the
three daemons by pid and removes the directory.

Run ``python tests/slurm/cluster.py`` to start one by hand and print the environment to use it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

__all__ = ["LocalSlurmCluster", "why_unavailable"]

_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")

# Fake accelerators on the node: the shipped GPU scripts ask for --gpus-per-node=8, and
# `sbatch --test-only` should check their real headers. Nothing uses them.
FAKE_GPUS = 8
# CPUs the node advertises (SlurmdParameters=config_overrides lets it exceed the hardware), so that
# the shipped headers' tasks-per-node x cpus-per-task fit. Jobs here run one task.
FAKE_CPUS = 128
# Extra nodes (State=CLOUD: defined, never started) for `sbatch --test-only` of multi-node scripts.
CLOUD_NODES = 15


def why_unavailable() -> Optional[str]:
    """Why a local cluster cannot start here (None: it can)."""
    if os.name != "posix" or not Path("/proc").is_dir():
        return "needs Linux"
    missing = [b for b in _BINARIES if shutil.which(b) is None]
    if missing:
        return (
            f"Slurm/munge not installed (missing {', '.join(missing)}); "
            "install with `bash .ci/slurm_setup.sh` (apt-get install slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        return "needs root (slurmd and munged run as root / the munge user)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    return None


def _free_ports(n: int) -> list:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


class LocalSlurmCluster:
    """munged + slurmctld + slurmd on localhost; see the module docstring."""

    def __init__(self, root: Optional[Path] = None):
        # Not under pytest's tmp_path: its parents are 0700 root and munged (as `munge`) must
        # traverse to its socket; munged also refuses group/other-writable parents.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="dirmoe-slurm-"))
        self.root.chmod(0o755)
        self.hostname = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.log_dir = self.root / "log"
        self.partition = "local"  # the default partition: this host only; jobs run here
        self.multinode_partition = "multinode"  # this host + the cloud nodes; --test-only only
        self._procs: dict = {}

    # ---------------------------------------------------------------- environment
    @property
    def env(self) -> dict:
        """Environment for Slurm client commands (and the jobs they submit)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":
                del env[var]  # a test run inside a Slurm job must not leak that job's settings
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, attempts: int = 3,
            **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster. With ``check``, a failing command is
        retried (a busy controller on a loaded machine answers RPCs late) before raising."""
        kw.setdefault("env", self.env)
        for attempt in range(attempts if check else 1):
            res = subprocess.run(list(cmd), timeout=timeout, capture_output=True, text=True, **kw)
            if res.returncode == 0 or not check:
                return res
            time.sleep(1 + attempt)
        raise RuntimeError(f"{' '.join(cmd)} failed with {res.returncode}: {res.stderr.strip()}")

    # ---------------------------------------------------------------- start / stop
    def start(self, timeout: float = 60) -> "LocalSlurmCluster":
        try:
            self._start_munge()
            self._write_slurm_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._wait(self._controller_up, timeout, "slurmctld answering `scontrol ping`")
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.hostname])
            self._wait(self.node_idle, timeout, f"node {self.hostname} idle in `sinfo`")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel the cluster's jobs, stop the daemons by pid (slurmd first), kill any process
        the cluster started that is still alive, and delete the cluster directory."""
        self._cancel_jobs()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._kill_leftovers()
        shutil.rmtree(self.root, ignore_errors=True)

    def _cancel_jobs(self, timeout: float = 30) -> None:
        ctld = self._procs.get("slurmctld")
        if ctld is None or ctld.poll() is not None:
            return
        jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=20).stdout.split()
        if not jobs:
            return
        self.run("scancel", *jobs, check=False, timeout=20)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-o", "%i", check=False, timeout=20).stdout.split():
                return
            time.sleep(0.5)

    def _kill_leftovers(self) -> None:
        """SIGKILL processes this cluster started that outlived its daemons (job steps whose
        slurmd is gone). They are recognised by their environment: everything slurmd starts
        inherits ``SLURM_CONF`` pointing at this cluster's private config."""
        marker = f"SLURM_CONF={self.conf}".encode() + b"\0"
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except OSError:
                    pass

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self) -> str:
        """Tails of the daemon logs, for assertion messages."""
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-30:]
            out.append(f"==> {path.name} <==\n" + "\n".join(lines))
        return "\n".join(out)

    # ---------------------------------------------------------------- internals
    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir()
        self.munge_dir.chmod(0o755)  # munged: clients must reach the socket
        key = self.munge_dir / "munge.key"
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        key.chmod(0o600)
        self._spawn(
            "munged",
            [
                "munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={self.munge_dir / 'munged.pid'}",
                f"--log-file={self.munge_dir / 'munged.log'}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
            ],
            user=munge.pw_uid, group=munge.pw_gid, extra_groups=[],
        )
        self._wait(self.munge_socket.exists, 20, "munged socket")

    def _write_slurm_conf(self) -> None:
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(exist_ok=True)
        ctld_port, slurmd_port = _free_ports(2)
        cpus = max(FAKE_CPUS, os.cpu_count() or 1)
        memory = max(1024, _free_memory_mb() - 1024)
        (self.root / "plugstack.conf").write_text("")
        # gres/gpu wants character devices: symlinks to /dev/null stand in for /dev/nvidia*.
        (self.root / "dev").mkdir()
        for i in range(FAKE_GPUS):
            (self.root / "dev" / f"fakegpu{i}").symlink_to("/dev/null")
        (self.root / "gres.conf").write_text(
            f"NodeName={self.hostname} Name=gpu File={self.root / 'dev'}/fakegpu[0-{FAKE_GPUS - 1}]\n"
        )
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=dirmoetest",
                    f"SlurmctldHost={self.hostname}(127.0.0.1)",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'run' / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.log_dir / 'slurmd.log'}",
                    f"PlugStackConfig={self.root / 'plugstack.conf'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SlurmdParameters=config_overrides",
                    "GresTypes=gpu",
                    "MpiDefault=none",
                    "MailProg=/bin/true",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "ReturnToService=2",
                    "SchedulerType=sched/builtin",
                    "SchedulerParameters=sched_interval=2",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    "KillWait=10",
                    "InactiveLimit=0",
                    "MinJobAge=600",
                    f"NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={cpus} "
                    f"RealMemory={memory} Gres=gpu:{FAKE_GPUS} State=UNKNOWN",
                    # Powered-down cloud nodes never run anything but let `sbatch --test-only`
                    # check multi-node headers in the second partition.
                    "SuspendProgram=/bin/true",
                    "ResumeProgram=/bin/true",
                    f"NodeName=cloud[1-{CLOUD_NODES}] CPUs={cpus} RealMemory={memory} "
                    f"Gres=gpu:{FAKE_GPUS} State=CLOUD",
                    f"PartitionName={self.partition} Nodes={self.hostname} Default=YES "
                    "MaxTime=INFINITE State=UP",
                    f"PartitionName={self.multinode_partition} "
                    f"Nodes={self.hostname},cloud[1-{CLOUD_NODES}] MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _spawn(self, name: str, cmd: list, **kw) -> None:
        self.log_dir.mkdir(exist_ok=True)
        with open(self.log_dir / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=self.env, **kw,
            )

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode} while waiting for {what}\n"
                        + self._daemon_output()
                    )
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n" + self._daemon_output())

    def _daemon_output(self) -> str:
        return "\n".join(
            f"==> {p.name} <==\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
            for p in sorted(self.log_dir.glob("*")) + [self.munge_dir / "munged.log"]
            if p.is_file()
        )

    def _controller_up(self) -> bool:
        res = self.run("scontrol", "ping", check=False, timeout=20)
        return res.returncode == 0 and "UP" in res.stdout

    def node_idle(self) -> bool:
        """Whether this host's node is idle (no job holds it, none is completing)."""
        res = self.run(
            "sinfo", "-h", "-n", self.hostname, "-p", self.partition, "-o", "%T",
            check=False, timeout=20,
        )
        return res.returncode == 0 and res.stdout.strip().rstrip("*") in ("idle", "mixed")


if __name__ == "__main__":  # start one by hand
    reason = why_unavailable()
    if reason:
        raise SystemExit(reason)
    cluster = LocalSlurmCluster().start()
    print(f"export SLURM_CONF={cluster.conf}\n# Ctrl-C stops the cluster")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
