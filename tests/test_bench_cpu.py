"""`bench.cpu`: the CPU per task of each process of a measurement, and the ceilings it implies."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.cpu import CpuSplit, cpu_markdown, process_seconds


def test_a_split_counts_the_cpu_each_role_spent_per_task() -> None:
    spin = "import time\nend = time.process_time() + 30\nwhile time.process_time() < end: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    try:
        split = CpuSplit({"busy": [busy.pid], "gone": [999_999_999], "none": []}).start()
        before = process_seconds(busy.pid)
        while process_seconds(busy.pid) < before + 0.3:  # its own clock: no fixed sleep
            os.sched_yield()
        figures = split.per_task(1000)
    finally:
        busy.kill()
        busy.wait()
    assert set(figures) == {"busy", "gone"}  # a role with no pid is left out
    assert figures["gone"] == 0.0  # a process that cannot be read counts nothing
    assert figures["busy"] >= 300  # ≥ 0.3 s over 1,000 tasks


def test_the_table_gives_medians_and_the_ceilings_they_imply() -> None:
    def run(rate: float, broker: float, worker: float, producer: float) -> dict[str, object]:
        return {
            "rate": rate,
            "cpu_us": {"broker": broker, "worker": worker, "producer": producer},
        }

    measured = {
        "fire": {
            "raw": [run(1000, 400, 300, 300), run(3000, 200, 300, 300), run(2000, 250, 250, 250)],
            "aioqueue": [run(5000, 100, 50, 50), run(6000, 100, 40, 60), run(4000, 120, 60, 20)],
        },
        "rpc": {"raw": [{"error": "no result"}]},
    }
    table = cpu_markdown(measured, cpus=2)
    rows = [line for line in table.splitlines() if line.startswith("| fire")]
    # raw: medians 250 + 300 + 300 = 850 µs; the broker alone allows 2 cores / 250 µs = 8,000/s
    assert rows[0] == "| fire | raw | 250 | 300 | 300 | 850 | 2,353 | 8,000 (4.0x raw) |"
    # aioqueue: 100 + 50 + 50 = 200 µs: 10,000/s; the broker: 20,000/s, 10x raw's 2,000/s
    assert rows[1] == "| fire | aioqueue | 100 | 50 | 50 | 200 | 10,000 | 20,000 (10.0x raw) |"
    assert "| rpc |" not in table  # no split measured there
    assert cpu_markdown({}, cpus=2) == ""
