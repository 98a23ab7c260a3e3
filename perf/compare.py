#!/usr/bin/env python3
"""Strata vs. its peers, side by side, in one run on one machine.

Runs strata-perf, fio and `qemu-img bench` on the same backends (null, a page-cache
file in tmpfs, an O_DIRECT file on the real filesystem), each pinned to one core, and
prints IOPS, CPU seconds per million I/Os and the Strata/peer ratios. See perf/README.md.

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STRATA_PERF = REPO / "target" / "release" / "strata-perf"
BS = 4096

# fio io_uring option sets tried for the "tuned" buffered row (no SQPOLL, no IOPOLL:
# hipri needs a polled block device, which a file on tmpfs is not). The best one wins.
FIO_TUNED_COMBOS: list[tuple[str, list[str]]] = [
    (
        "batch",
        [
            "--iodepth_batch_submit=32",
            "--iodepth_batch_complete_min=1",
            "--iodepth_batch_complete_max=32",
        ],
    ),
    (
        "batch+fixedbufs+registerfiles",
        [
            "--iodepth_batch_submit=32",
            "--iodepth_batch_complete_min=1",
            "--iodepth_batch_complete_max=32",
            "--fixedbufs=1",
            "--registerfiles=1",
        ],
    ),
    (
        "batch8+fixedbufs+registerfiles+norandommap",
        [
            "--iodepth_batch_submit=8",
            "--iodepth_batch_complete_min=1",
            "--iodepth_batch_complete_max=32",
            "--fixedbufs=1",
            "--registerfiles=1",
            "--norandommap",
            "--randrepeat=0",
        ],
    ),
]


# --------------------------------------------------------------------------- helpers


class ToolError(Exception):
    """A run that could not produce a number; the message goes into the table."""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1G, 512M, 4096)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    size = int(m.group(1)) * mult[m.group(2).lower()]
    if size < 16 << 20 or size % (1 << 20):
        raise argparse.ArgumentTypeError("size must be a multiple of 1 MiB, at least 16M")
    return size


def size_str(size: int) -> str:
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % mult == 0:
            return f"{size // mult}{unit}"
    return str(size)


def num(x: float) -> str:
    """Seconds for fio/strata-perf: integers stay integers."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def scatter_step(size: int) -> int:
    """A qemu-img bench step (-S) that scatters its otherwise sequential offsets.

    qemu-img bench issues offset, offset+step, offset+2*step, ... wrapped modulo the
    image size (qemu 10.0) or the image size minus the buffer size (later qemu). With a
    step of p blocks, p a prime near 0.618 * blocks that divides neither modulus, the
    offsets walk every 4 KiB block once per pass in a scattered, non-sequential order:
    no two neighbouring requests touch neighbouring blocks, so neither readahead nor
    device-side merging helps. It is a fixed stride, not random.
    """
    blocks = size // BS
    p = int(blocks * 0.618) | 1
    while not (is_prime(p) and blocks % p and (blocks - 1) % p):
        p += 2
    return p * BS


def fs_type(path: Path) -> str:
    """Filesystem type of the directory holding path, e.g. ext4, tmpfs ('' if unknown)."""
    try:
        p = subprocess.run(["stat", "-f", "-c", "%T", str(path)], stdout=subprocess.PIPE, text=True)
        return p.stdout.strip()
    except OSError:
        return ""


def tail(text: str, lines: int = 6) -> str:
    rows = [r for r in text.strip().splitlines() if r.strip()]
    return " | ".join(rows[-lines:])


def load_json_doc(text: str, what: str) -> dict:
    text = text.strip()
    if not text:
        raise ToolError(f"{what} printed nothing on stdout (expected one JSON document)")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    start = text.find("{")  # tolerate notes printed before the document
    if start >= 0:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            pass
    raise ToolError(f"{what} did not print a JSON document: {tail(text, 3)[:300]}")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def core_busy_sec(cpu: int) -> float | None:
    """Seconds core `cpu` has spent not idle (incl. irq, softirq and steal) since boot."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith(f"cpu{cpu} "):
                    v = [int(x) for x in line.split()[1:]]
                    # user nice system idle iowait irq softirq steal (guest is in user)
                    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class Proc:
    stdout: str
    stderr: str
    elapsed: float
    user: float
    sys: float
    core_busy: float | None  # busy seconds of the pinned core during the run


def other_load(p: Proc) -> float | None:
    """Share of the run's wall time the pinned core was busy with something else."""
    if p.core_busy is None or p.elapsed <= 0:
        return None
    return max(0.0, p.core_busy - (p.user + p.sys)) / p.elapsed


OTHER_LOAD_WARN = 0.10


def run_measured(cmd: list[str], timeout: float, verbose: bool, cpu: int | None = None) -> Proc:
    """Run cmd, return its output, wall time and the CPU time of its whole process tree.

    RUSAGE_CHILDREN deltas cover every thread of the child and of the children it waited
    for: fio's job processes, io_uring's io-wq workers (iou-wrk-*), strata-perf's reactors.
    """
    if verbose:
        print(f"    $ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    busy0 = core_busy_sec(cpu) if cpu is not None else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    try:
        p = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout
        )
    except FileNotFoundError as e:
        raise ToolError(f"{cmd[0]}: not found ({e.filename})") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{Path(cmd[0]).name} timed out after {timeout:.0f}s") from None
    elapsed = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1 = core_busy_sec(cpu) if cpu is not None else None
    if p.returncode != 0:
        msg = tail(p.stderr) or tail(p.stdout)
        raise ToolError(f"exit status {p.returncode}: {msg[:400]}")
    return Proc(
        p.stdout,
        p.stderr,
        elapsed,
        after.ru_utime - before.ru_utime,
        after.ru_stime - before.ru_stime,
        busy1 - busy0 if busy0 is not None and busy1 is not None else None,
    )


@dataclass
class Measurement:
    tool: str
    iops: float | None = None
    ios: float | None = None  # I/Os completed in the run
    elapsed_sec: float | None = None  # wall time of the whole process
    run_sec: float | None = None  # the measured interval the tool reports
    cpu_user_sec: float | None = None  # rusage of the whole process tree
    cpu_sys_sec: float | None = None
    tool_cpu_sec: float | None = None  # CPU the tool reports itself (fio: job thread only)
    startup_cpu_sec: float = 0.0  # fixed startup CPU already subtracted from cpu_*_sec
    # Busy time of the pinned core not spent by the measured process (other processes,
    # interrupts, hypervisor steal), as a share of the run's wall time.
    other_load: float | None = None
    cmd: list[str] = field(default_factory=list)
    note: str = ""
    error: str | None = None
    runs: list[dict] = field(default_factory=list)  # every repetition, with --repeat

    @property
    def cpu_sec(self) -> float | None:
        if self.cpu_user_sec is None or self.cpu_sys_sec is None:
            return None
        return self.cpu_user_sec + self.cpu_sys_sec

    @property
    def cpu_per_mio(self) -> float | None:
        """CPU seconds per million I/Os."""
        if self.cpu_sec is None or not self.ios:
            return None
        return self.cpu_sec / self.ios * 1e6

    @property
    def cpu_util(self) -> float | None:
        """CPU seconds per second of the measured interval, in percent."""
        span = self.run_sec or self.elapsed_sec
        if self.cpu_sec is None or not span:
            return None
        return self.cpu_sec / span * 100

    def to_json(self) -> dict:
        d = asdict(self)
        d["cpu_sec"] = self.cpu_sec
        d["cpu_sec_per_million_io"] = self.cpu_per_mio
        d["cpu_util_percent"] = self.cpu_util
        d["cmd"] = shlex.join(self.cmd) if self.cmd else None
        return d


@dataclass
class Case:
    id: str
    group: str  # null | buffered | direct
    title: str
    rw: str  # randread | randwrite
    qd: int
    results: list[Measurement] = field(default_factory=list)


# ---------------------------------------------------------------------------- runner


# Maps a file and mlocks it, so its page cache stays resident for the run (this host
# evicts the page cache of ext4 files within seconds). Printed "locked" means ready.
MLOCK_SNIPPET = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
if addr is None or addr == ctypes.c_void_p(-1).value:
    sys.exit("mmap failed: " + os.strerror(ctypes.get_errno()))
if libc.mlock(addr, size) != 0:
    sys.exit("mlock failed: " + os.strerror(ctypes.get_errno()))
print("locked", flush=True)
signal.pause()
"""


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.pin = ["taskset", "-c", str(args.cpu)]
        self.timeout = args.time * 4 + 120
        self.strata_error: str | None = None
        self.qemu_counts: dict[str, int] = {}
        self.fio_fixed: tuple[float, float] | None = None
        self.shm_file: Path | None = None
        self.direct_file: Path | None = None
        self.pagecache_file: Path | None = None
        self.locker: subprocess.Popen | None = None
        self.created: list[Path] = []

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # --- files --------------------------------------------------------------------

    def make_file(self, path: Path, what: str) -> None:
        size = self.a.size
        try:
            st = path.stat()
            if st.st_size == size and st.st_blocks * 512 >= size:
                self.log(f"  reusing {what} file {path} ({size_str(size)})")
                return
        except FileNotFoundError:
            pass
        self.log(f"  writing {what} file {path} ({size_str(size)}, non-zero data)")
        chunk = os.urandom(1 << 20)
        # Written for real (not fallocate): reads of unwritten extents would be served
        # as zeros by the filesystem without touching the device.
        with open(path, "wb") as f:
            for _ in range(size >> 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        self.created.append(path)

    def prepare_files(self, groups: set[str]) -> None:
        if "buffered" in groups:
            shm = Path(self.a.shm_dir)
            if fs_type(shm) not in ("tmpfs", "ramfs", ""):
                self.log(
                    f"WARNING: --shm-dir {shm} is {fs_type(shm)}, not tmpfs: the host may evict "
                    "its page cache during the run, so the 'page cache' case may hit the disk"
                )
            self.shm_file = shm / "strata-compare-buffered.img"
            self.make_file(self.shm_file, "page-cache (tmpfs)")
        if "pagecache" in groups:
            self.pagecache_file = Path(self.a.dir) / "strata-compare-pagecache.img"
            self.make_file(self.pagecache_file, "page-cache (mlocked)")
            self.locker = subprocess.Popen(
                [sys.executable, "-c", MLOCK_SNIPPET, str(self.pagecache_file)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            line = self.locker.stdout.readline().strip() if self.locker.stdout else ""
            if line != "locked":
                err = self.locker.stderr.read() if self.locker.stderr else ""
                raise SystemExit(f"compare: cannot mlock {self.pagecache_file}: {err.strip() or line}")
            self.log(f"  {self.pagecache_file} is resident and locked in the page cache")
        if "direct" in groups:
            d = Path(self.a.dir)
            if fs_type(d) in ("tmpfs", "ramfs"):
                # Older kernels refuse O_DIRECT on tmpfs; newer ones (6.6+) accept it and
                # serve it from the page cache, which is not what this case measures.
                raise SystemExit(
                    f"compare: --dir {d} is {fs_type(d)}; the O_DIRECT case needs a file on a "
                    "real filesystem (e.g. /var/tmp)"
                )
            self.direct_file = d / "strata-compare-direct.img"
            self.make_file(self.direct_file, "O_DIRECT")
            try:
                fd = os.open(self.direct_file, os.O_RDONLY | os.O_DIRECT)
                os.close(fd)
            except OSError as e:
                raise SystemExit(
                    f"compare: {d} does not support O_DIRECT ({e.strerror}); "
                    "pass --dir on a real filesystem (not tmpfs)"
                ) from None

    def cleanup(self) -> None:
        if self.locker:
            self.locker.kill()
            self.locker.wait()
        if self.a.keep_files:
            for p in (self.shm_file, self.direct_file, self.pagecache_file):
                if p:
                    self.log(f"keeping {p}")
            return
        for p in (self.shm_file, self.direct_file, self.pagecache_file):
            if p:
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    # --- repetition -----------------------------------------------------------------

    def repeat(self, tool: str, once: Callable[[], Measurement]) -> Measurement:
        """Run `once` --repeat times, keep the median by IOPS, record every run."""
        runs: list[Measurement] = []
        for _ in range(self.a.repeat):
            try:
                m = once()
            except ToolError as e:
                return Measurement(tool=tool, error=str(e), cmd=getattr(e, "cmd", []))
            runs.append(m)
        runs.sort(key=lambda m: m.iops or 0)
        best = runs[(len(runs) - 1) // 2]
        if len(runs) > 1:
            best.runs = [
                {"iops": r.iops, "cpu_sec": r.cpu_sec, "ios": r.ios, "elapsed_sec": r.elapsed_sec}
                for r in runs
            ]
        return best

    # --- strata-perf ------------------------------------------------------------------

    def ensure_strata(self) -> None:
        if self.a.skip_strata:
            return
        path = Path(self.a.strata_perf)
        default = path.resolve() == DEFAULT_STRATA_PERF.resolve()
        if default and not self.a.no_build:
            cmd = ["cargo", "build", "--release", "-p", "strata-perf"]
            self.log(f"building strata-perf: {shlex.join(cmd)}")
            p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if p.returncode != 0:
                errors = [ln for ln in p.stdout.splitlines() if ln.startswith("error")]
                first = errors[0] if errors else tail(p.stdout, 2)
                self.strata_error = f"cargo build -p strata-perf failed: {first[:200]}"
                self.log(p.stdout)
                return
        if not path.is_file() or not os.access(path, os.X_OK):
            self.strata_error = f"strata-perf not found at {path}" + (
                "" if default else " (--strata-perf)"
            )

    def strata(self, case: Case, node: str) -> Measurement | None:
        tool = "strata-perf"
        if self.a.skip_strata:
            return None
        if self.strata_error:
            return Measurement(tool=tool, error=self.strata_error)
        cmd = self.pin + [
            str(self.a.strata_perf),
            "-q", str(case.qd),
            "-o", "4k",
            "-w", case.rw,
            "-t", num(self.a.time),
            "-m", hex(1 << self.a.cpu),
            "--node", node,
            "--json",
        ]  # fmt: skip
        if self.a.poll_mode:
            cmd += ["--poll-mode", self.a.poll_mode]

        def once() -> Measurement:
            try:
                p = run_measured(cmd, self.timeout, self.a.verbose, self.a.cpu)
                doc = load_json_doc(p.stdout, "strata-perf")
                total = doc.get("total") or (doc.get("results") or [None])[0]
                if not isinstance(total, dict) or "iops" not in total:
                    raise ToolError("strata-perf JSON has no total.iops")
                iops = float(total["iops"])
                runtime = float(total.get("runtime") or self.a.time)
                failed = int(total.get("io_failed") or 0)
                verify = int(total.get("verify_errors") or 0)
                if failed or verify:
                    raise ToolError(f"strata-perf: io_failed={failed} verify_errors={verify}")
                cpu = doc.get("cpu") or {}
                tool_cpu = None
                if "user_sec" in cpu and "sys_sec" in cpu:
                    tool_cpu = float(cpu["user_sec"]) + float(cpu["sys_sec"])
            except ToolError as e:
                e.cmd = cmd  # type: ignore[attr-defined]
                raise
            return Measurement(
                tool=tool,
                iops=iops,
                ios=iops * runtime,
                elapsed_sec=p.elapsed,
                other_load=other_load(p),
                run_sec=runtime,
                cpu_user_sec=p.user,
                cpu_sys_sec=p.sys,
                tool_cpu_sec=tool_cpu,
                cmd=cmd,
                note=f"poll-mode {self.a.poll_mode}" if self.a.poll_mode else "",
            )

        return self.repeat(tool, once)

    # --- fio --------------------------------------------------------------------------

    def fio_startup(self) -> tuple[float, float]:
        """CPU (user, sys) fio spends before and after any I/O, mostly calibrating its
        clock (~0.15 s here). It is a fixed cost unrelated to the workload, so it is
        measured once (min of 3 one-I/O runs) and subtracted from every fio run."""
        if self.fio_fixed is None:
            cmd = self.pin + [
                "fio", "--name=startup", "--ioengine=null", "--size=1M",
                "--rw=read", "--number_ios=1", "--output-format=json",
            ]  # fmt: skip
            samples = []
            for _ in range(3):
                try:
                    p = run_measured(cmd, self.timeout, self.a.verbose, self.a.cpu)
                    samples.append((p.user, p.sys))
                except ToolError as e:
                    self.log(f"  fio startup cost not measured ({e}); not subtracted")
                    break
            if samples:
                self.fio_fixed = (min(u for u, _ in samples), min(s for _, s in samples))
                self.log(
                    f"  fio fixed startup CPU: {sum(self.fio_fixed):.3f} s per run (subtracted)"
                )
            else:
                self.fio_fixed = (0.0, 0.0)
        return self.fio_fixed

    def fio(self, case: Case, tool: str, opts: list[str], note: str = "") -> Measurement:
        cmd = self.pin + [
            "fio",
            f"--name={case.id}",
            "--output-format=json",
            f"--rw={case.rw}",
            f"--bs={BS}",
            f"--iodepth={case.qd}",
            "--time_based",
            f"--runtime={num(self.a.time)}",
        ] + opts
        ddir = "read" if "read" in case.rw else "write"
        fixed_user, fixed_sys = self.fio_startup()

        def once() -> Measurement:
            try:
                p = run_measured(cmd, self.timeout, self.a.verbose, self.a.cpu)
                doc = load_json_doc(p.stdout, "fio")
                job = doc["jobs"][0]
                if job.get("error"):
                    raise ToolError(f"fio job error {job['error']}: {tail(p.stderr, 2)}")
                d = job[ddir]
                job_runtime = float(job.get("job_runtime") or d.get("runtime") or 0) / 1000
                tool_cpu = (float(job["usr_cpu"]) + float(job["sys_cpu"])) / 100 * job_runtime
            except (KeyError, IndexError, TypeError, ValueError) as e:
                err = ToolError(f"unexpected fio JSON ({e!r})")
                err.cmd = cmd  # type: ignore[attr-defined]
                raise err from None
            except ToolError as e:
                e.cmd = cmd  # type: ignore[attr-defined]
                raise
            return Measurement(
                tool=tool,
                iops=float(d["iops"]),
                ios=float(d["total_ios"]),
                elapsed_sec=p.elapsed,
                other_load=other_load(p),
                run_sec=job_runtime or None,
                cpu_user_sec=max(0.0, p.user - fixed_user),
                cpu_sys_sec=max(0.0, p.sys - fixed_sys),
                tool_cpu_sec=tool_cpu,
                startup_cpu_sec=fixed_user + fixed_sys,
                cmd=cmd,
                note=note,
            )

        return self.repeat(tool, once)

    def fio_tuned(self, case: Case, base: list[str]) -> Measurement:
        tried: list[Measurement] = []
        for name, extra in FIO_TUNED_COMBOS:
            m = self.fio(case, "fio io_uring tuned", base + extra, note=name)
            self.progress(case, m, f" [try {name}]")
            tried.append(m)
        ok = [m for m in tried if m.error is None]
        if not ok:
            return tried[0]
        best = max(ok, key=lambda m: m.iops or 0)
        combos = [
            {"combo": m.note, "iops": m.iops, "cpu_sec": m.cpu_sec, "error": m.error}
            for m in tried
        ]
        best.note = f"best of {len(tried)}: {best.note}"
        best.runs = best.runs + combos
        return best

    # --- qemu-img bench ------------------------------------------------------------------

    def qemu_img(self, case: Case, tool: str, args: list[str], note: str = "") -> Measurement:
        """qemu-img bench runs a fixed count; calibrate it to last about --time seconds."""

        def cmd_for(count: int) -> list[str]:
            cmd = self.pin + ["qemu-img", "bench", "-c", str(count), "-d", str(case.qd), "-s", str(BS)]
            if case.rw == "randwrite":
                cmd.append("-w")
            return cmd + args

        def run(count: int) -> tuple[Proc, float, list[str]]:
            cmd = cmd_for(count)
            try:
                p = run_measured(cmd, self.timeout, self.a.verbose, self.a.cpu)
            except ToolError as e:
                e.cmd = cmd  # type: ignore[attr-defined]
                raise
            m = re.search(r"Run completed in ([0-9.]+) seconds", p.stdout)
            if not m:
                err = ToolError(f"qemu-img bench: no 'Run completed' line: {tail(p.stdout, 2)}")
                err.cmd = cmd  # type: ignore[attr-defined]
                raise err
            return p, float(m.group(1)), cmd

        key = f"{case.id}/{tool}"
        if key not in self.qemu_counts:
            try:
                count = 10000
                while True:
                    _, secs, _ = run(count)
                    if secs >= 0.25 or count >= 1 << 30:
                        break
                    count = int(count * min(100.0, max(2.0, 0.5 / max(secs, 0.001))))
                self.qemu_counts[key] = max(1000, int(count / secs * self.a.time))
            except ToolError as e:
                return Measurement(tool=tool, error=str(e), cmd=getattr(e, "cmd", []))
        count = self.qemu_counts[key]

        def once() -> Measurement:
            p, secs, cmd = run(count)
            if secs <= 0:
                raise ToolError("qemu-img bench reported 0 seconds")
            return Measurement(
                tool=tool,
                iops=count / secs,
                ios=count,
                elapsed_sec=p.elapsed,
                other_load=other_load(p),
                run_sec=secs,
                cpu_user_sec=p.user,
                cpu_sys_sec=p.sys,
                cmd=cmd,
                note=note,
            )

        return self.repeat(tool, once)

    # --- cases -------------------------------------------------------------------------

    def progress(self, case: Case, m: Measurement, suffix: str = "") -> None:
        if m.other_load is not None and m.other_load > OTHER_LOAD_WARN and "core busy" not in m.note:
            warn = f"core busy {m.other_load * 100:.0f}% with other work"
            m.note = f"{m.note}; {warn}" if m.note else warn
        if m.error:
            self.log(f"  [{case.id}] {m.tool}{suffix}: ERROR {m.error}")
        else:
            cpm = m.cpu_per_mio
            cpm_s = f"{cpm:.3f}" if cpm is not None else "-"
            self.log(
                f"  [{case.id}] {m.tool}{suffix}: {m.iops:,.0f} IOPS, "
                f"{cpm_s} CPU s/1M I/O" + (f"  ({m.note})" if m.note else "")
            )

    def add(self, case: Case, m: Measurement | None) -> None:
        if m is None:
            return
        self.progress(case, m)
        case.results.append(m)

    def run_case(self, case: Case) -> None:
        self.log(f"== {case.title}")
        size = self.a.size
        if case.group == "null":
            null = f"driver=null-co,size={size},read-zeroes=off"
            self.add(case, self.strata(case, null))
            self.add(
                case,
                self.qemu_img(case, "qemu-img bench", ["--image-opts", null], note="sequential offsets"),
            )
            self.add(case, self.fio(case, "fio null", ["--ioengine=null", f"--size={size}"]))
        elif case.group in ("buffered", "pagecache"):
            f = str(self.shm_file if case.group == "buffered" else self.pagecache_file)
            self.add(case, self.strata(case, f"driver=file,filename={f}"))
            base = ["--ioengine=io_uring", f"--filename={f}"]
            self.add(case, self.fio(case, "fio io_uring", base))
            self.add(case, self.fio_tuned(case, base))
            step = scatter_step(size)
            self.add(
                case,
                self.qemu_img(
                    case,
                    "qemu-img bench",
                    ["-t", "writeback", "-i", "io_uring", "-S", str(step), "-f", "raw", f],
                    note=f"strided offsets, step {step // BS} blocks",
                ),
            )
        elif case.group == "direct":
            f = str(self.direct_file)
            self.add(case, self.strata(case, f"driver=file,filename={f},cache.direct=on"))
            self.add(case, self.fio(case, "fio io_uring", ["--ioengine=io_uring", "--direct=1", f"--filename={f}"]))
            step = scatter_step(size)
            self.add(
                case,
                self.qemu_img(
                    case,
                    "qemu-img bench",
                    ["-t", "none", "-i", "io_uring", "-S", str(step), "-f", "raw", f],
                    note=f"strided offsets, step {step // BS} blocks",
                ),
            )


def all_cases() -> list[Case]:
    return [
        Case("null-randread-qd1", "null", "null: 4k randread qd1", "randread", 1),
        Case("null-randread-qd32", "null", "null: 4k randread qd32", "randread", 32),
        Case("buffered-randread-qd32", "buffered", "file, page cache (tmpfs): 4k randread qd32", "randread", 32),
        Case("pagecache-randread-qd32", "pagecache", "file, page cache (ext4, mlocked): 4k randread qd32", "randread", 32),
        Case("direct-randread-qd32", "direct", "file, O_DIRECT: 4k randread qd32", "randread", 32),
        Case("direct-randwrite-qd32", "direct", "file, O_DIRECT: 4k randwrite qd32", "randwrite", 32),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- output


def fmt_iops(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def print_table(cases: list[Case], out=sys.stdout) -> None:
    head = ["case", "tool", "IOPS", "CPU s/1M IO", "CPU %", "IOPS S/peer", "CPU/IO S/peer", "note"]
    rows: list[list[str]] = []
    for case in cases:
        strata = next((m for m in case.results if m.tool == "strata-perf" and m.error is None), None)
        first = True
        for m in case.results:
            label = case.title if first else ""
            first = False
            if m.error:
                rows.append([label, m.tool, "ERROR", "", "", "", "", m.error[:90]])
                continue
            cpm = m.cpu_per_mio
            util = m.cpu_util
            r_iops = r_cpu = "-"
            if m.tool == "strata-perf":
                r_iops = r_cpu = "1.00"
            elif strata is not None:
                r_iops = f"{strata.iops / m.iops:.2f}" if m.iops else "-"
                if cpm and strata.cpu_per_mio is not None:
                    r_cpu = f"{strata.cpu_per_mio / cpm:.2f}"
            rows.append(
                [
                    label,
                    m.tool,
                    fmt_iops(m.iops),
                    f"{cpm:.3f}" if cpm is not None else "-",
                    f"{util:.0f}" if util is not None else "-",
                    r_iops,
                    r_cpu,
                    m.note,
                ]
            )
        rows.append([])
    widths = [max(len(head[i]), *(len(r[i]) for r in rows if r)) for i in range(len(head))]
    right = {2, 3, 4, 5, 6}

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    print(line(head), file=out)
    print(line(["-" * w for w in widths]), file=out)
    for r in rows[:-1]:
        print(line(r) if r else "", file=out)
    print(
        "\nIOPS S/peer > 1: Strata does more I/O per second.  CPU/IO S/peer < 1: Strata spends"
        "\nless CPU per I/O.  CPU = user+sys of the whole process tree (getrusage), so io_uring"
        "\nio-wq workers and fio's helper processes count, less fio's fixed startup (clock"
        "\ncalibration); CPU % = CPU / the measured interval the tool reports. 'core busy N%'"
        "\nflags runs where the pinned core also ran other processes, interrupts or steal.",
        file=out,
    )


def tool_version(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
        return p.stdout.strip().splitlines()[0] if p.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Run Strata's benchmark and its peers (fio, qemu-img bench) on the same "
        "machine and files, pinned to one core, and print IOPS, CPU per I/O and ratios.",
    )
    ap.add_argument("--time", type=float, default=5.0, help="seconds per run (default 5)")
    ap.add_argument(
        "--only",
        default="null,buffered,pagecache,direct",
        help="comma-separated groups: null, buffered, pagecache, direct (default all)",
    )
    ap.add_argument("--strata-perf", default=str(DEFAULT_STRATA_PERF), help="strata-perf binary")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build for strata-perf")
    ap.add_argument("--skip-strata", action="store_true", help="run the peers only")
    ap.add_argument("--poll-mode", choices=["busy", "hybrid", "interrupt"], help="strata-perf --poll-mode")
    ap.add_argument("--dir", default="/var/tmp", help="directory for the O_DIRECT file (default /var/tmp)")
    ap.add_argument("--shm-dir", default="/dev/shm", help="tmpfs directory for the page-cache file")
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"), help="file and null device size (default 1G)")
    ap.add_argument("--cpu", type=int, default=1, help="the one core every measured process is pinned to (default 1)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool; the median by IOPS is reported")
    ap.add_argument("--keep-files", action="store_true", help="keep the test files (and reuse them next time)")
    ap.add_argument("--json", metavar="FILE", help="also write all results as JSON to FILE")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every command run")
    a = ap.parse_args(argv)

    groups = {g.strip() for g in a.only.split(",") if g.strip()}
    bad = groups - {"null", "buffered", "pagecache", "direct"}
    if bad or not groups:
        ap.error(f"--only: unknown group(s) {', '.join(sorted(bad)) or '(none given)'}")
    if a.time <= 0 or a.repeat < 1:
        ap.error("--time must be > 0 and --repeat >= 1")
    allowed = os.sched_getaffinity(0)
    if a.cpu not in allowed:
        ap.error(f"--cpu {a.cpu} is not one of this process's CPUs {sorted(allowed)}")
    missing = [t for t in ("taskset", "fio", "qemu-img") if shutil.which(t) is None]
    if missing:
        print(f"compare: missing {', '.join(missing)}: run scripts/install-deps.sh", file=sys.stderr)
        return 2

    bench = Bench(a)
    cases = [c for c in all_cases() if c.group in groups]
    started = time.time()
    try:
        bench.ensure_strata()
        if bench.strata_error:
            bench.log(f"WARNING: {bench.strata_error}; peers still run")
        bench.prepare_files(groups)
        for case in cases:
            bench.run_case(case)
    except KeyboardInterrupt:
        bench.log("interrupted")
        return 130
    finally:
        bench.cleanup()

    print()
    print(
        f"Strata vs peers: 4 KiB I/O, one core (taskset -c {a.cpu}), {num(a.time)} s per run"
        + (f", median of {a.repeat}" if a.repeat > 1 else "")
        + f", files {size_str(a.size)}"
    )
    print()
    print_table(cases)

    if a.json:
        doc = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "machine": {
                "kernel": platform.release(),
                "cpus": os.cpu_count(),
                "fio": tool_version(["fio", "--version"]),
                "qemu_img": tool_version(["qemu-img", "--version"]),
                "strata_perf": None if a.skip_strata else str(a.strata_perf),
            },
            "options": {
                "time": a.time,
                "cpu": a.cpu,
                "size": a.size,
                "repeat": a.repeat,
                "poll_mode": a.poll_mode,
                "groups": sorted(groups),
                "direct_dir": a.dir,
                "shm_dir": a.shm_dir,
            },
            "cases": [
                {
                    "id": c.id,
                    "title": c.title,
                    "workload": c.rw,
                    "queue_depth": c.qd,
                    "io_size": BS,
                    "results": [m.to_json() for m in c.results],
                }
                for c in cases
            ],
        }
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"\nwrote {a.json}")

    peer_failed = any(m.error for c in cases for m in c.results if m.tool != "strata-perf")
    strata_failed = not a.skip_strata and any(
        m.error for c in cases for m in c.results if m.tool == "strata-perf"
    )
    shared = [
        f"{c.id}/{m.tool}"
        for c in cases
        for m in c.results
        if m.other_load is not None and m.other_load > OTHER_LOAD_WARN
    ]
    if shared:
        print(
            f"\ncompare: WARNING: core {a.cpu} was busy with other work during {len(shared)} "
            f"run(s) ({', '.join(shared)}); their numbers are low. Rerun on a quiet machine.",
            file=sys.stderr,
        )
    if strata_failed:
        print("\ncompare: strata-perf runs failed (see ERROR rows)", file=sys.stderr)
    if peer_failed:
        print("\ncompare: some peer runs failed (see ERROR rows)", file=sys.stderr)
    return 1 if (strata_failed or peer_failed) else 0


if __name__ == "__main__":
    sys.exit(main())
