"""The quality benchmark on stories260k: rows in their own processes (their progress shown), the JSON it writes, and
--resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import STORIES
from vqmobile.bench import quality


def test_rows_and_resume(tmp_path, capfd):
    out = tmp_path / "q.json"
    def common(windows=2):
        return ["--model", str(STORIES), "--ctx", "512", "--windows", str(windows), "--nsamples", "4",
                "--seqlen", "128", "--json", str(out)]

    assert quality.main([*common(), "--rows", "fp", "rtn:bits=4,group=32"]) == 0
    first = json.loads(out.read_text())
    fp, rtn = first["rows"]
    assert fp["bpw"] == 32.0 and fp["windows"] == 2 and rtn["bpw"] > 4.0 and rtn["ppl"] > fp["ppl"]
    assert 0 < rtn["quantize_peak_rss_mb"] <= rtn["peak_rss_mb"] and "quantize_peak_rss_mb" not in fp
    err = capfd.readouterr().err  # each row's own progress, shown while it runs
    assert "rtn: 100%" in err and "perplexity ctx=512" in err

    assert quality.main([*common(), "--resume", "--rows", "fp", "rtn:bits=4,group=32", "gptq:bits=4,group=32"]) == 0
    printed = capfd.readouterr().out
    assert "fp: kept from" in printed and "rtn:bits=4,group=32: kept from" in printed
    second = json.loads(out.read_text())
    assert second["rows"][:2] == first["rows"] and second["rows"][2]["row"] == "gptq:bits=4,group=32"

    # a new row ahead of kept ones: the kept rows after it stay in the file
    rows = ["fp", "rtn:bits=3,group=32", "rtn:bits=4,group=32", "gptq:bits=4,group=32"]
    assert quality.main([*common(), "--resume", "--rows", *rows]) == 0
    third = json.loads(out.read_text())
    assert [r["row"] for r in third["rows"]] == rows and third["rows"][2:] == second["rows"][1:]
    capfd.readouterr()

    # other settings (here: window count) make earlier rows stale: they run again
    png = tmp_path / "charts" / "q.png"
    assert quality.main([*common(3), "--resume", "--rows", "fp", "--plot", str(png)]) == 0
    assert "kept from" not in capfd.readouterr().out and json.loads(out.read_text())["rows"][0]["windows"] == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the chart, written atomically beside no leftovers
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["charts", "q.json", "q.png"]


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == pid]


def _ppid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_a_killed_benchmark_takes_its_row_along(tmp_path):
    """SIGTERM to the benchmark ends the row's process too (its result could go nowhere), and nothing is written."""
    out = tmp_path / "q.json"
    bench = subprocess.Popen([sys.executable, "-m", "vqmobile.bench.quality", "--model", str(STORIES), "--ctx", "512",
                              "--nsamples", "4", "--seqlen", "128", "--rows", "gptq:bits=4,group=32", "--json",
                              str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (rows := _children(bench.pid)) and time.time() < deadline and bench.poll() is None:
        time.sleep(0.2)
    assert rows, "the row's process never started"
    os.kill(bench.pid, signal.SIGTERM)
    assert bench.wait(timeout=60) == 128 + signal.SIGTERM
    for pid in rows:
        deadline = time.time() + 30
        while Path(f"/proc/{pid}").exists() and _ppid(Path(f"/proc/{pid}")) is not None and time.time() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists() or _ppid(Path(f"/proc/{pid}")) is None, "the row outlived the benchmark"
    assert not out.exists()
