"""How fast this host gives a process back memory it freed: at once, and after a pause.

    python benchmarks/refault.py [--gib=1.4] [--pauses=0,0.5,1,2,3,5] [--repeats=3]

XLA:CPU allocates each run of a compiled program's temporaries afresh and frees them when the
run ends (1.4 GB for the main job's train step), so every update faults its temporaries in
again, and the host's price for that fault is part of the step time. On bare metal the price is
the kernel zeroing the pages. A virtual machine whose kernel reports free pages to the
hypervisor (virtio-balloon free page reporting, Linux's ``page_reporting``) hands memory back
to the host a moment after it is freed; touching it again then faults on the host as well.
Whether that happens between two updates depends on how long the gap is (sampling, a
checkpoint save), so on such a host the update's system time, and with it the step time,
varies from step to step (benchmarks/README.md, "Main job").

For each pause this script allocates ``--gib`` GiB, writes one byte per 4 KiB page, frees it,
waits the pause, and times the same again: wall and system seconds of the fault-in (median of
``--repeats``), and, where the kernel exposes it, the memory it reported to the hypervisor
during the pause.
"""

import os
import resource
import time

import numpy as np
from absl import app, flags

from _common import machine, restart_with_huge_pages

_GIB = flags.DEFINE_float("gib", 1.4, "GiB to allocate and touch (the main job's train step: 1.4).")
_PAUSES = flags.DEFINE_list("pauses", ["0", "0.5", "1", "2", "3", "5"], "Seconds between the free and the next "
                            "allocation.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repetitions per pause (the median is printed).")

_REPORTED = "/sys/module/page_reporting/parameters/reported_kib"  # not in every kernel's page_reporting
_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"


def _reported_kib() -> int | None:
    try:
        with open(_REPORTED) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _fault_in(n_bytes: int) -> tuple[float, float]:
    """(wall s, system s) to allocate ``n_bytes`` and write one byte per 4 KiB page; freed after."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    block = np.empty(n_bytes, np.uint8)
    block[::4096] = 1
    wall = time.perf_counter() - t0
    system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - r0.ru_stime
    del block  # a block this large is its own mapping: freeing it unmaps it
    return wall, system


def main(argv):
    del argv
    n_bytes = int(_GIB.value * 2**30)
    print(f"machine: {machine()}")
    reporting = "yes" if os.path.exists(_ORDER) else "no"
    print(f"kernel free page reporting (page_reporting module): {reporting}; {_GIB.value:g} GiB per fault-in, "
          f"median of {_REPEATS.value}")
    wall, system = _fault_in(n_bytes)
    print(f"first touch: {wall:6.3f} s (system {system:6.3f} s)")
    for pause in (float(p) for p in _PAUSES.value):
        runs = []
        for _ in range(_REPEATS.value):
            _fault_in(n_bytes)  # the memory to be freed, freshly touched
            k0 = _reported_kib()
            time.sleep(pause)
            k1 = _reported_kib()
            runs.append((*_fault_in(n_bytes), None if k0 is None or k1 is None else (k1 - k0) / 1024))
        wall, system = (float(np.median([r[i] for r in runs])) for i in (0, 1))
        reported = [r[2] for r in runs]
        line = (f"after a {pause:4.1f} s pause: {wall:6.3f} s (system {system:6.3f} s) = "
                f"{_GIB.value / wall:6.1f} GiB/s")
        if None not in reported:
            line += f"; reported to the hypervisor during the pause: {float(np.median(reported)):7.0f} MiB"
        print(line)


if __name__ == "__main__":
    restart_with_huge_pages()
    app.run(main)
