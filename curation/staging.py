"""Staging of a volume's uint8 copies while its xz / yz planes are cut (RAM or ``CORPUS/work``),
and the janitor process that removes them if the run is killed."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from curation.corpus import release_in_child


def _reserve(path: Path, nbytes: int, free: int) -> None:
    """Allocate the blocks of a sparse staging file now (``free``: bytes free on its disk): a
    memory-mapped write into a full disk kills the writing process (SIGBUS) instead of raising,
    which would take the run down."""
    try:
        if nbytes > free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    except (AttributeError, OSError) as err:
        if getattr(err, "errno", None) != errno.ENOSPC:
            return  # file systems without fallocate (some network mounts): the free-space check must do
        path.unlink(missing_ok=True)
        raise OSError(f"not enough free space in {path.parent} to stage the volume's uint8 copy: "
                      f"needs {nbytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free") from err


_janitor_fds: set[int] = set()  # write ends of janitor pipes: forked workers must not keep them


def _drop_janitor_pipes() -> None:
    """In a forked child: let go of the janitors' pipes (else a janitor would wait for the
    workers too); /dev/null over the descriptor, as for the corpus lock."""
    release_in_child(_janitor_fds)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_janitor_pipes)


class StagingArea:
    """Where a volume's uint8 copies live while its xz / yz planes are cut: the volume as read,
    (z, y, x), for the xz planes, and an x-first copy, (x, z, y), for the yz planes.

    In RAM (``/dev/shm``) when the machine can spare it: the copy is scratch, and on disk its
    writes compete with the shards for the disk's bandwidth (measured here: ~375 MB/s sustained,
    so a 400 MB staging file costs ~1 s of a 4 s run). Otherwise, and always with a Dask cluster
    (whose workers do not share this machine's RAM), ``CORPUS/work``. RAM staging is bounded by
    ``ram_fraction`` of the available memory over all volumes staged at once; files are removed
    when their source is done or fails and when the run stops (error, Ctrl-C); what a killed run
    left behind is removed by :meth:`discard_leftovers` when the next run on the corpus starts.
    """

    def __init__(self, root: Path, use_ram: bool = True, ram_fraction: float = 0.25) -> None:
        self.root = Path(root)
        self.use_ram = use_ram and Path("/dev/shm").is_dir()
        self.ram_fraction = ram_fraction
        self.live: dict[str, list[Path]] = {}
        self._ram_bytes: dict[str, int] = {}
        tag = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        self._ram_prefix = f"cemnet-{os.getuid() if hasattr(os, 'getuid') else 0}-{tag}-"
        self._janitor: tuple[int, int] | None = None  # (pid, write end of its pipe)
        self._told = False

    def _paths(self, source: str, layout: str = "zyx") -> tuple[Path, Path]:
        name = f"{source}.u8.npy" if layout == "zyx" else f"{source}.{layout}.u8.npy"
        return Path("/dev/shm") / f"{self._ram_prefix}{name}", self.root / "work" / name

    def _ram_to_spare(self) -> int:
        try:
            with open("/proc/meminfo") as fh:
                available = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
            shm = os.statvfs("/dev/shm")
        except (OSError, StopIteration):
            return 0
        budget = min(available * self.ram_fraction, shm.f_bavail * shm.f_frsize * 0.5)
        return int(budget) - sum(self._ram_bytes.values())

    def free_bytes(self, folder: Path) -> int:
        """Free space on the disk of ``folder``."""
        return shutil.disk_usage(folder).free

    def create(self, source: str, shape: tuple[int, int, int], layout: str = "zyx") -> str:
        """A fresh, empty uint8 memmap of ``source``'s (z, y, x) ``shape`` stored in ``layout``
        order ("zyx", or "xzy": x first); any earlier file of it is discarded (units do not
        fsync it, so one left by a crash may hold zeros)."""
        ram, disk = self._paths(source, layout)
        for old in (ram, disk):
            old.unlink(missing_ok=True)
        nbytes = int(np.prod(shape))
        path = ram if self.use_ram and nbytes <= self._ram_to_spare() else disk
        if not self._told:  # where the scratch lives, should nothing be able to remove it
            self._told = True
            tqdm.write(f"staging volumes in {path.parent} ({self._ram_prefix if path == ram else ''}*.u8.npy): removed "
                       "as each source ends; if the run is killed, by a clean-up process or the next run on the "
                       "corpus, else remove them by hand", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = tuple(shape["zyx".index(a)] for a in layout)
        self.live.setdefault(source, []).append(path)  # before it exists: a Ctrl-C in between still removes it
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=stored).flush()
        if path == disk:
            _reserve(path, nbytes, self.free_bytes(path.parent))
        if path == ram:
            self._ram_bytes[source] = self._ram_bytes.get(source, 0) + nbytes
        return str(path)

    def start_janitor(self) -> None:
        """Fork a small process that removes this corpus's staging files if this run dies
        without doing so itself (SIGKILL, OOM killer). It waits on a pipe whose only writer is
        this process: the pipe closes when this process ends, however it ends, or when
        :meth:`close` is called. It then removes what is left, but only after taking the corpus
        lock (never while a new run on the corpus uses it), and exits. It runs in its own
        session so that Ctrl-C or a closed terminal does not stop it first."""
        if self._janitor is not None or not hasattr(os, "fork"):
            return
        import fcntl

        lock_path = str(self.root / ".lock")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the janitor: no imports, no output (another thread may hold their locks)
            try:
                os.close(write_end)
                quiet = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):  # hold no pipe of the caller's (`cemnet curate ... | tee log` ends with us)
                    os.dup2(quiet, fd)
                os.setsid()
                os.read(read_end, 1)  # returns when every writer is gone
                if self._leftovers():
                    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
                    # The dead run's lock may be released a moment after its pipe closes; a new
                    # run that holds it longer removes the files itself, so give up after a while.
                    for _ in range(100):
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except OSError:
                            time.sleep(0.05)
                    else:
                        os._exit(0)
                    for path in self._leftovers():  # listed again under the lock
                        path.unlink(missing_ok=True)
                    try:
                        os.rmdir(f"/dev/shm/{self._ram_prefix}units")
                    except OSError:
                        pass
            finally:
                os._exit(0)
        os.close(read_end)
        _janitor_fds.add(write_end)
        self._janitor = (pid, write_end)

    def close(self) -> None:
        """Remove every staging file of this run and send its janitor away."""
        self.release_all()
        if self._janitor is not None:
            pid, write_end = self._janitor
            _janitor_fds.discard(write_end)
            os.close(write_end)
            os.waitpid(pid, 0)  # it finds nothing left and exits at once
            self._janitor = None

    def unit_dirs(self) -> list[Path]:
        """Folders of the unit staging files (exemplars-only storage, see :class:`ExemplarStore`):
        RAM first when this run may use it, then ``CORPUS/work/units``."""
        ram = Path("/dev/shm") / f"{self._ram_prefix}units"
        return ([ram] if self.use_ram else []) + [self.root / "work" / "units"]

    def _leftovers(self) -> list[Path]:
        shm = Path("/dev/shm").is_dir()
        stale = sorted(Path("/dev/shm").glob(f"{self._ram_prefix}*.u8.npy")) if shm else []
        stale += sorted((self.root / "work").glob("*.u8.npy"))
        for units in (Path("/dev/shm") / f"{self._ram_prefix}units", self.root / "work" / "units"):
            stale += sorted(units.glob("*.npy*")) if units.is_dir() else []  # staged units' patches
        return stale

    def discard_leftovers(self) -> list[Path]:
        """Remove staging files that a killed run (SIGKILL, OOM, power loss) left for this corpus,
        in RAM and in ``CORPUS/work``. Only call it while holding the corpus lock (as
        :class:`curation.scheduler.Scheduler` does): then no other run can be using them. Returns what was removed."""
        stale = self._leftovers()
        live = {p for paths in self.live.values() for p in paths}
        for path in stale:
            if path not in live:
                path.unlink(missing_ok=True)
        return stale

    def release(self, source: str) -> None:
        self._ram_bytes.pop(source, None)
        for path in self.live.pop(source, []):
            path.unlink(missing_ok=True)

    def release_all(self) -> None:
        for source in list(self.live):
            self.release(source)
