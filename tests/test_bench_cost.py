"""`vqmobile bench cost`: the static cycle model compiles the real kernel sources, follows the marked code and runs
llvm-mca on it. One row on one core per architecture the machine can compile for (skipped with the reason when
llvm-mca or a compiler is missing); bad options are one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest

from vqmobile.bench import cost
from vqmobile.cli import main


def _mca():
    try:
        return cost.find_llvm_mca(None)
    except Exception as e:  # noqa: BLE001 - the reason becomes the skip message
        pytest.skip(str(e))


@pytest.mark.parametrize("core,path,cc", [("neoverse-n1", "neon_dot", "aarch64-linux-gnu-gcc"),
                                          pytest.param("znver3", "avx2", "gcc", marks=pytest.mark.slow)],
                         ids=["arm64", "x86"])  # x86: kern_avx2.c takes ~35 s to compile
def test_bench_cost_one_row(tmp_path, capsys, core, path, cc):
    mca, _ = _mca()
    if cost._compiler(cost.ARCH[path]) is None:
        pytest.skip(f"{cc} is not installed")
    if core not in cost.known_cpus(mca, cost.CORES[core].arch):
        pytest.skip(f"{mca} does not know -mcpu={core}")
    out = tmp_path / "cost.json"
    assert main(["bench", "cost", "--rows", "vq2.25", "--cores", core, "--paths", path, "--iterations", "50",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "static model (llvm-mca" in text and "not a timing" in text
    line = next(ln for ln in text.splitlines() if ln.startswith(core) and " vq2.25 " in ln)
    assert float(line.split()[4]) > 0
    rec = json.loads(out.read_text())
    assert rec["model"].startswith("static model") and rec["workload"] == "int8 activations, batch 1"
    (r,) = rec["results"]
    assert (r["row"], r["core"], r["path"]) == ("vq2.25", core, path)
    assert r["cycles_per_1024"] > 0 and r["gbps_per_ghz"] > 0 and r["vs_int4_g32"] is None
    # one unit = a 4-row tile x one 256-column codebook block, its trace the marked loop and finish
    (u,) = r["units"]
    assert u["weights"] == 4 * 256 and u["instructions"] > 20 and u["cycles"] > 0
    assert r["gbps_per_ghz"] == pytest.approx(r["bpw"] / 8 * 1024 / r["cycles_per_1024"], rel=1e-2)


def test_bench_cost_bad_options(capsys):
    assert main(["bench", "cost", "--rows", "vq9"]) == 2
    assert "--rows: unknown vq9" in capsys.readouterr().err
    assert main(["bench", "cost", "--cores", "pentium"]) == 2
    assert "--cores: unknown pentium" in capsys.readouterr().err
    if shutil.which("llvm-mca") or any(shutil.which(f"llvm-mca-{v}") for v in range(14, 31)):
        assert main(["bench", "cost", "--llvm-mca", "/nonexistent/llvm-mca"]) == 2
        assert "not found" in capsys.readouterr().err
