"""`vqmobile bench cost`: a static cycle model of the native kernels (llvm-mca), per weight format and named core.

The phone is the one machine we cannot time, so this measures the code instead: the real kernel sources
(native/src/kern_*.c) are compiled to assembly with the project's flags by the compiler for the core's architecture
(gcc for x86-64, aarch64-linux-gnu-gcc for arm64), with -DVQM_MCA, which turns the kernels' VQM_MCA_BEGIN/END markers
(native/src/internal.h) into comment lines. For each kernel the model follows the compiled code from a marker to its
partner (`Part`: a loop body from the end of one iteration around the back-edge to the end of the next, or a
straight stretch such as the per-block finish), strings the parts together in the order and number one unit of work
runs them (`Unit`: e.g. one codebook block of a 4-row tile = the chunk loop's iterations + the finish), and runs
`llvm-mca -mcpu=<core>` on that trace. Cycles per unit / weights per unit gives cycles per 1024 weights; with the
row's bytes per weight it gives the memory bandwidth per GHz of clock below which the kernel is memory-bound rather
than compute-bound (bytes/weight x weights/cycle = GB/s per GHz).

It is a static model, not a timing: llvm-mca simulates an out-of-order pipeline from the scheduling model LLVM has
for the core (latencies, ports, issue widths), with every load hitting L1, perfect branch prediction and no
front-end stalls. What each kernel leaves out (software prefetches, rarely taken paths, per-row set-up) is listed
with it (`Kernel.excluded`). Workload: int8 activations, batch 1 (decoding one token), the kernels the dispatcher
picks for each row. LLVM's arm64 big-core models are those of the Neoverse cores, whose microarchitectures the
phone cores share (Neoverse N1 = Cortex-A76, Neoverse V1 = Cortex-X1); LLVM schedules `cortex-a76` and `cortex-x1`
themselves with its Cortex-A57 model. A core whose model LLVM borrows from another is flagged in the output.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vqmobile import atomic
from vqmobile.errors import UserError

NATIVE = Path(__file__).resolve().parents[2] / "native"
# native/Makefile's BASEFLAGS and CFLAGS (minus -g and -Wall/-Wextra, which do not change the code)
CFLAGS = ["-std=gnu11", "-O2", "-fPIC", "-ffp-contract=off", "-fno-math-errno"]
ITERATIONS = 200


# ---------------------------------------------------------------- what is measured
@dataclass(frozen=True)
class Row:
    """A weight format: VQ (d, ncent, R x C codebook blocks), group-wise int (bits, group) or E8P (QuIP#, e8p = 2, 3
    or 4 bits)."""

    name: str
    d: int = 0
    ncent: int = 0
    R: int = 0
    C: int = 0
    bits: int = 0
    group: int = 0
    e8p: int = 0

    @property
    def vq(self) -> bool:
        return self.d > 0

    @property
    def bpw(self) -> float:
        """Stored bits per weight: codes, codebooks and fp16 scales (int: fp16 scale per group, symmetric; E8P: its
        codes, the per-layer scales and signs being negligible)."""
        if self.e8p:
            return float(self.e8p)
        if self.vq:
            b = max(1, (self.ncent - 1).bit_length())
            return b / self.d + (8 * self.ncent * self.d + 16) / (self.R * self.C)
        return self.bits + 16 / self.group


ROWS = {r.name: r for r in (
    Row("vq2.125", d=2, ncent=16, R=8, C=256),
    Row("vq2.25", d=2, ncent=16, R=4, C=256),
    Row("vq2.25-d4k256", d=4, ncent=256, R=128, C=256),
    Row("vq3.125", d=2, ncent=64, R=32, C=256),
    Row("int4-g32", bits=4, group=32),
    Row("int8-g32", bits=8, group=32),
    Row("e8p2", e8p=2),
    Row("e8p3", e8p=3),
    Row("e8p4", e8p=4),
)}
BASELINE = "int4-g32"


@dataclass(frozen=True)
class Part:
    """Code between the markers `tag` (with its four compile-time parameters). loop=True: one steady-state iteration
    of the loop whose body the markers enclose, followed from the END marker around the back-edge back to it.
    take: the conditional branches (numbered from 0 in the order the walk meets them) that the hot path takes; the
    others fall through."""

    tag: str
    params: tuple[int, int, int, int]
    count: int = 1
    loop: bool = False
    take: tuple[int, ...] = ()


@dataclass(frozen=True)
class Unit:
    """A repeating piece of work: its parts in execution order, and the weights it covers."""

    parts: tuple[Part, ...]
    weights: int
    what: str


@dataclass(frozen=True)
class Kernel:
    path: str
    function: str
    units: tuple[Unit, ...]
    excluded: str
    source: str | None = None  # the file holding it, when not SOURCES[path]


SOURCES = {"avx2": "kern_avx2.c", "avx512": "kern_avx512.c", "neon": "kern_neon.c", "neon_dot": "kern_neon_dot.c"}
E8P_SOURCES = {"avx2": "e8p_avx2.c", "avx512": "e8p_avx512.c", "neon": "e8p_neon.c", "neon_dot": "e8p_neon_dot.c"}
ARCH = {"avx2": "x86_64", "avx512": "x86_64", "neon": "aarch64", "neon_dot": "aarch64"}


def _vq_cfg(row: Row) -> tuple[int, int, int]:
    """(bits per code, components per code, table entries) as the SIMD paths decode the row (internal.h)."""
    return max(1, (row.ncent - 1).bit_length()), row.d, row.ncent


def kernel(path: str, row: Row) -> Kernel:
    """The hot code the dispatcher runs for `row` on `path` (int8 activations, batch 1), as parts of the source."""
    if row.e8p:  # row_b1: one row's full chunks, a chunk per iteration (both stages and the finish)
        tag = {"avx2": "avx2", "avx512": "avx512", "neon": "neon", "neon_dot": "neon"}[path]
        codes = 64 if path == "avx512" else 32
        return Kernel(path, "e8p row_b1", (Unit((Part(f"{tag}.e8p.loop", (row.e8p, 0, 0, 0), loop=True),),
                                                8 * codes, f"1 row x {codes} codes"),),
                      "activation preparation (per call), partial last chunk", E8P_SOURCES[path])
    if path == "avx2":
        if row.vq:  # vq_same_impl: R % 4 == 0 in every row, codebooks without -128 (SAFE)
            be, de, ke = _vq_cfg(row)
            n = row.C // de // 32
            return Kernel(path, "vq_same_impl", (Unit((Part("avx2.vq_same.loop", (1, be, de, ke), n, loop=True),
                                                      Part("avx2.vq_same.finish", (be, de, ke, 0))),
                                                     4 * row.C, f"4-row tile x {row.C}-column block"),),
                          "tables (rebuilt every R rows), software prefetch, partial chunks")
        if row.bits == 4:
            return Kernel(path, "int4_g32_i8", (Unit((Part("avx2.int4_g32.loop", (0, 0, 0, 0), loop=True),), 512,
                                                     "8 rows x 2 groups of 32"),),
                          "software prefetch, the fp16 scale transposition (every 8 groups)")
        return Kernel(path, "int_rows_i8", (Unit((Part("avx2.int_rows.loop", (8, 0, 0, 0), loop=True),), 128,
                                                 "4 rows x 1 group of 32"),), "software prefetch")
    if path == "avx512":
        if row.vq:  # vq_tile8 where each half of eight rows lies in one codebook row block, else vq_tile4 (SAME)
            be, de, ke = _vq_cfg(row)
            n = row.C // de // 64
            split = int(row.R % 8 != 0)  # the tile's halves in two row blocks: two sets of table registers
            nr, fn, tag, ids = ((8, "vq_tile8", "avx512.vq_tile8", (split, split)) if row.R % 4 == 0
                                else (4, "vq_tile4", "avx512.vq_tile", (3, 1)))
            tables = "16-entry tables built per block" if nr == 8 and ke == 16 else "tables (rebuilt every R rows)"
            return Kernel(path, fn, (Unit((Part(f"{tag}.loop", (be, de, ke, ids[0]), n, loop=True),
                                           Part(f"{tag}.finish", (be, de, ke, ids[1]))),
                                          nr * row.C, f"{nr}-row tile x {row.C}-column block"),),
                          tables + ", software prefetch" + ("" if nr == 8 else ", partial chunks"))
        return Kernel(path, "int_rows_i8", (Unit((Part("avx512.int_tile.loop", (row.bits, 32, 0, 0), loop=True),), 512,
                                                 "4 rows x 4 groups of 32"),), "software prefetch")
    if path in ("neon", "neon_dot"):
        if row.vq and row.ncent == 256:  # vq_rows_impl, one row at a time
            be, de, ke = _vq_cfg(row)
            return Kernel(path, "vq_rows_impl", (Unit((Part("neon.vq_rows.loop", (be, de, 1, 1), row.C // de // 64,
                                                            loop=True),
                                                       Part("neon.vq_rows.finish", (be, de, 1, 1))),
                                                      row.C, f"1 row x {row.C}-column block"),),
                          "software prefetch, partial chunks, tables (rebuilt every R rows)")
        if row.vq:  # vq_tile4: R % 4 == 0 in every row; tables in registers
            be, de, ke = _vq_cfg(row)
            nr = 2 if ke == 64 else 4  # rows per pass over a block's chunks
            n = row.C // de // 64 * (4 // nr)
            return Kernel(path, "vq_tile4", (Unit((Part("neon.vq_tile.tables", (be, de, ke, 0)),
                                                   Part("neon.vq_tile.loop", (be, de, ke, nr), n, loop=True),
                                                   Part("neon.vq_tile.finish", (be, de, ke, 0))),
                                                  4 * row.C, f"4-row tile x {row.C}-column block"),),
                          "software prefetch, partial chunks" + (", tables (rebuilt every R rows)"
                                                                 if ke != 16 else ""))
        return Kernel(path, "int_g32_i8", (Unit((Part("neon.int_g32.loop", (row.bits, 0, 0, 0), loop=True),), 128,
                                                "4 rows x 1 group of 32"),), "nothing")
    raise ValueError(path)


@dataclass(frozen=True)
class Core:
    name: str
    role: str
    arch: str
    paths: tuple[str, ...]


CORES = {c.name: c for c in (
    Core("znver3", "x86 AVX2 (AMD Zen 3)", "x86_64", ("avx2",)),
    Core("znver4", "x86 AVX-512 (AMD Zen 4)", "x86_64", ("avx512", "avx2")),
    Core("icelake-server", "x86 AVX-512 (Intel Ice Lake)", "x86_64", ("avx512", "avx2")),
    Core("sapphirerapids", "x86 AVX-512 (Intel Sapphire Rapids)", "x86_64", ("avx512", "avx2")),
    Core("cortex-a55", "arm64 little core", "aarch64", ("neon_dot", "neon")),
    Core("neoverse-n1", "arm64 big core (Cortex-A76 microarchitecture)", "aarch64", ("neon_dot", "neon")),
    Core("neoverse-v1", "arm64 X-class core (Cortex-X1 microarchitecture)", "aarch64", ("neon_dot", "neon")),
    Core("cortex-a76", "arm64 big core", "aarch64", ("neon_dot", "neon")),
    Core("cortex-x1", "arm64 X-class core", "aarch64", ("neon_dot", "neon")),
)}
DEFAULT_CORES = ("znver3", "znver4", "icelake-server", "cortex-a55", "neoverse-n1", "neoverse-v1")
TRIPLE = {"x86_64": "x86_64-unknown-linux-gnu", "aarch64": "aarch64-unknown-linux-gnu"}
# an LLVM without a model of its own for a core schedules it with an older core's; this one shows it (arm64)
_PROBE = {"aarch64": "tbl v0.16b, {v1.16b, v2.16b, v3.16b, v4.16b}, v5.16b\nsdot v6.4s, v0.16b, v7.16b\n"
                     "ld1 {v8.16b}, [x0], #16\nsmull v9.8h, v8.8b, v0.8b\nsadalp v10.4s, v9.8h\n"}
_PROBE_REF = {"aarch64": "cortex-a57"}


# ---------------------------------------------------------------- tools
def find_llvm_mca(explicit: str | None) -> tuple[str, str]:
    """(path, version) of llvm-mca: `explicit`, else the newest llvm-mca-N on PATH, else llvm-mca."""
    cands = [explicit] if explicit else [f"llvm-mca-{v}" for v in range(30, 13, -1)] + ["llvm-mca"]
    for c in cands:
        exe = shutil.which(c)
        if exe:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
            m = re.search(r"LLVM version (\S+)", out)
            return exe, m[1] if m else "?"
    if explicit:
        raise UserError(f"--llvm-mca {explicit}: not found")
    raise UserError("llvm-mca is not installed: apt-get install llvm-19 (or pass --llvm-mca PATH)")


def _compiler(arch: str) -> str | None:
    host = platform.machine()
    names = ["gcc"] if host == arch else []
    names.append(f"{arch}-linux-gnu-gcc")
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


def compile_asm(path: str, workdir: Path, source: str | None = None) -> str:
    """The assembly of `path`'s kernel source (or of `source`) with the markers on."""
    source = source or SOURCES[path]
    cc = _compiler(ARCH[path])
    if cc is None:
        raise UserError(f"no C compiler for {ARCH[path]} (apt-get install gcc-aarch64-linux-gnu for arm64)")
    if not (NATIVE / "src" / source).is_file():
        raise UserError(f"{NATIVE / 'src'} has no {source}: the cost model needs the native/ sources "
                        "(a source checkout)")
    out = workdir / f"{Path(source).stem}.s"
    cmd = [cc, *CFLAGS, "-DVQM_MCA", f"-I{NATIVE / 'include'}", f"-I{NATIVE / 'src'}", "-S",
           str(NATIVE / "src" / source), "-o", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return out.read_text()


# ---------------------------------------------------------------- assembly walk
_MARK = re.compile(r"vqm-mca (begin|end) (\S+) (-?\d+) (-?\d+) (-?\d+) (-?\d+)")
_LABEL = re.compile(r"^([.\w$]+):")


def parse_asm(text: str) -> list[tuple[str, object]]:
    """The assembly as ('label', name) / ('mark', (what, tag, params)) / ('insn', text), directives dropped."""
    out: list[tuple[str, object]] = []
    for line in text.splitlines():
        s = line.strip()
        m = _MARK.search(s)
        if m:
            out.append(("mark", (m[1], m[2], tuple(int(m[i]) for i in range(3, 7)))))
            continue
        m = _LABEL.match(s)
        if m:
            out.append(("label", m[1]))
            s = s[m.end():].strip()
        if not s or s.startswith(("#", "//", "@", ";")) or s.startswith("."):
            continue
        out.append(("insn", s))
    return out


def _branch(insn: str, arch: str) -> tuple[str, str | None]:
    """('jump' | 'cond' | 'stop' | '', target label) of an instruction."""
    op, _, rest = insn.partition(" ") if " " in insn else insn.partition("\t")
    op, rest = op.strip(), rest.strip()
    if arch == "x86_64":
        if op == "jmp":
            return ("stop", None) if rest.startswith("*") else ("jump", rest)
        if op.startswith("j"):
            return "cond", rest
        return ("stop", None) if op in ("ret", "retq", "ud2") else ("", None)
    if op == "b":
        return "jump", rest
    if op.startswith("b.") or op in ("beq", "bne", "bcs", "bhs", "bcc", "blo", "bmi", "bpl", "bvs", "bvc", "bhi",
                                     "bls", "bge", "blt", "bgt", "ble"):
        return "cond", rest
    if op in ("cbz", "cbnz", "tbz", "tbnz"):
        return "cond", rest.rsplit(",", 1)[1].strip()
    return ("stop", None) if op in ("ret", "br", "brk") else ("", None)


def extract(asm: list[tuple[str, object]], part: Part, arch: str) -> list[str]:
    """The instructions of one execution of `part`, following the compiled control flow."""
    labels = {v: i for i, (k, v) in enumerate(asm) if k == "label"}
    key = (part.tag, part.params)
    ends = [i for i, (k, v) in enumerate(asm) if k == "mark" and v[0] == "end" and (v[1], v[2]) == key]
    if not ends:
        raise RuntimeError(f"no marker {part.tag} {part.params} in the compiled {arch} code")
    if part.loop:
        start = ends[0] + 1
    else:
        begins = [i for i, (k, v) in enumerate(asm[:ends[0]]) if k == "mark" and v[0] == "begin" and (v[1], v[2]) == key]
        if not begins:
            raise RuntimeError(f"no begin marker before the end of {part.tag} {part.params}")
        start = begins[-1] + 1
    trace: list[str] = []
    i, ncond, back = start, 0, not part.loop
    for _ in range(100000):
        if i >= len(asm):
            raise RuntimeError(f"{part.tag} {part.params}: walked off the end of the code")
        kind, v = asm[i]
        if kind == "mark" and v[0] == "end" and (v[1], v[2]) == key:
            return trace
        i += 1
        if kind != "insn":
            continue
        trace.append(v)
        what, target = _branch(v, arch)
        if what == "stop":
            raise RuntimeError(f"{part.tag} {part.params}: the walk reached `{v}`")
        if what in ("jump", "cond") and target not in labels:
            raise RuntimeError(f"{part.tag} {part.params}: unknown branch target in `{v}`")
        # a loop's back-edge: the first conditional branch back to the body (at or before the end marker)
        edge = what == "cond" and not back and labels[target] <= ends[0]
        if what == "jump" or (what == "cond" and ncond in part.take) or edge:
            back = back or edge
            i = labels[target]
        if what == "cond":
            ncond += 1
    raise RuntimeError(f"{part.tag} {part.params}: no way back to the end marker (a loop in the walk?)")


# ---------------------------------------------------------------- llvm-mca
@dataclass
class McaResult:
    cycles: float          # per iteration of the trace (steady state over `iterations`)
    rthroughput: float     # llvm-mca's Block RThroughput: the resource-bound lower limit per iteration
    instructions: int      # per iteration


def run_mca(mca: str, arch: str, cpu: str, trace: list[str], iterations: int, mattr: str = "") -> McaResult:
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write("\n".join(trace) + "\n")
        name = f.name
    try:
        cmd = [mca, f"-mtriple={TRIPLE[arch]}", f"-mcpu={cpu}", f"-iterations={iterations}", name]
        if mattr:
            cmd.insert(3, f"-mattr={mattr}")
        p = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(name)
    if p.returncode:
        raise RuntimeError(f"llvm-mca -mcpu={cpu} failed: {p.stderr.strip()[-1500:]}")
    def num(label: str) -> float:
        m = re.search(rf"^{label}:\s+([\d.]+)", p.stdout, re.M)
        if not m:
            raise RuntimeError(f"llvm-mca output has no '{label}'")
        return float(m[1])
    its = num("Iterations")
    return McaResult(num("Total Cycles") / its, num("Block RThroughput"), int(num("Instructions") / its))


def model_alias(mca: str, core: Core) -> str | None:
    """The core LLVM schedules `core` like, when that is another one (same llvm-mca output on a probe)."""
    ref = _PROBE_REF.get(core.arch)
    if ref is None or core.name == ref:
        return None
    def report(cpu: str) -> str:
        p = subprocess.run([mca, f"-mtriple={TRIPLE[core.arch]}", f"-mcpu={cpu}", "-mattr=+dotprod",
                            "-iterations=10", "-"], input=_PROBE[core.arch], capture_output=True, text=True)
        return p.stdout
    return ref if report(core.name) == report(ref) else None


def known_cpus(mca: str, arch: str) -> set[str]:
    p = subprocess.run([mca, f"-mtriple={TRIPLE[arch]}", "-mcpu=help"], capture_output=True, text=True)
    return set(re.findall(r"^\s+([\w.-]+)\s+- Select the", p.stdout + p.stderr, re.M))


# ---------------------------------------------------------------- the benchmark
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default: all of {', '.join(ROWS)})")
    parser.add_argument("--cores", default=",".join(DEFAULT_CORES),
                        help=f"comma-separated llvm-mca CPU names (default {','.join(DEFAULT_CORES)}; known: "
                             f"{', '.join(CORES)})")
    parser.add_argument("--paths", default=None, help="comma-separated kernel paths (default: each core's own)")
    parser.add_argument("--llvm-mca", default=None, help="llvm-mca executable (default: the newest installed)")
    parser.add_argument("--iterations", type=int, default=ITERATIONS, help=f"llvm-mca iterations (default {ITERATIONS})")
    parser.add_argument("--asm-dir", default=None, help="also write every trace given to llvm-mca here (for review)")
    parser.add_argument("--json", default="bench_results/cost.json")


def _split(text: str, known, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in known]
    if bad or not items:
        raise UserError(f"--{what}: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(known)}")
    return items


def measure(rows: list[str], cores: list[str], paths: list[str] | None, mca: str, iterations: int,
            asm_dir: Path | None = None, progress=print) -> tuple[list[dict], dict[str, dict]]:
    """One record per (row, core, path); and per core its LLVM model note."""
    records, core_info = [], {}
    asm_cache: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cname in cores:
            core = CORES[cname]
            if cname not in known_cpus(mca, core.arch):
                raise UserError(f"this llvm-mca does not know -mcpu={cname}: install a newer LLVM (apt-get install "
                                "llvm-19) or choose other --cores")
            alias = model_alias(mca, core)
            core_info[cname] = {"role": core.role, "arch": core.arch, "model_of": alias}
            for path in core.paths:
                if paths and path not in paths:
                    continue
                for rname in rows:
                    row = ROWS[rname]
                    k = kernel(path, row)
                    source = k.source or SOURCES[path]
                    if source not in asm_cache:
                        t0 = time.time()
                        asm_cache[source] = parse_asm(compile_asm(path, Path(tmp), source))
                        progress(f"compiled {source} for {ARCH[path]} ({time.time() - t0:.1f} s)")
                    cyc = rth = 0.0
                    units = []
                    for u in k.units:
                        trace = [ins for p in u.parts for _ in range(p.count)
                                 for ins in extract(asm_cache[source], p, core.arch)]
                        if asm_dir:
                            asm_dir.mkdir(parents=True, exist_ok=True)
                            (asm_dir / f"{cname}_{path}_{rname}_{len(units)}.s").write_text("\n".join(trace) + "\n")
                        r = run_mca(mca, core.arch, cname, trace, iterations,
                                    "+dotprod" if core.arch == "aarch64" else "")
                        cyc += 1024 * r.cycles / u.weights
                        rth += 1024 * r.rthroughput / u.weights
                        units.append({"what": u.what, "weights": u.weights, "cycles": round(r.cycles, 2),
                                      "rthroughput": r.rthroughput, "instructions": r.instructions,
                                      "parts": [f"{p.tag} {' '.join(map(str, p.params))} x{p.count}" for p in u.parts]})
                    records.append({
                        "row": rname, "bpw": round(row.bpw, 4), "core": cname, "path": path, "kernel": k.function,
                        "cycles_per_1024": round(cyc, 1), "rthroughput_per_1024": round(rth, 1),
                        "gbps_per_ghz": round(row.bpw / 8 * 1024 / cyc, 3), "units": units, "excluded": k.excluded,
                    })
    for r in records:
        base = next((b for b in records if b["row"] == BASELINE and b["core"] == r["core"] and b["path"] == r["path"]),
                    None)
        r["vs_int4_g32"] = round(r["cycles_per_1024"] / base["cycles_per_1024"], 3) if base else None
    return records, core_info


def format_table(records: list[dict], core_info: dict[str, dict], llvm: str) -> str:
    lines = [f"static model (llvm-mca {llvm}), not a timing: int8 activations, batch 1, every load an L1 hit",
             "cycles/1024w: modelled cycles per 1024 weights; vs int4-g32: ratio to the int4 g32 kernel on the same "
             "core and path;",
             "GB/s per GHz: memory bandwidth per GHz of clock below which the kernel is memory-bound",
             ""]
    hdr = f"{'core':<15} {'path':<9} {'row':<14} {'bpw':>6} {'cycles/1024w':>12} {'vs int4-g32':>11} {'GB/s per GHz':>12}"
    cur = None
    for r in records:
        if r["core"] != cur:
            cur = r["core"]
            info = core_info[cur]
            note = f"; LLVM has no model of its own: scheduled as {info['model_of']}" if info["model_of"] else ""
            lines += ["", f"{cur}: {info['role']}{note}", hdr]
        ratio = f"{r['vs_int4_g32']:.2f}x" if r["vs_int4_g32"] is not None else "-"
        lines.append(f"{r['core']:<15} {r['path']:<9} {r['row']:<14} {r['bpw']:>6.3f} {r['cycles_per_1024']:>12.1f} "
                     f"{ratio:>11} {r['gbps_per_ghz']:>12.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    rows = _split(args.rows, ROWS, "rows")
    cores = _split(args.cores, CORES, "cores")
    paths = _split(args.paths, SOURCES, "paths") if args.paths else None
    if args.iterations < 10:
        raise UserError("--iterations must be at least 10")
    mca, version = find_llvm_mca(args.llvm_mca)
    records, core_info = measure(rows, cores, paths, mca, args.iterations,
                                 Path(args.asm_dir) if args.asm_dir else None)
    if not records:
        raise UserError("no kernel path of the chosen cores is in --paths")
    print(format_table(records, core_info, version))
    atomic.write_json(args.json, {
        "benchmark": "cost", "model": f"static model (llvm-mca {version}), not a timing",
        "llvm_mca": mca, "llvm_version": version, "iterations": args.iterations,
        "workload": "int8 activations, batch 1", "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "cores": core_info, "rows": {n: asdict(ROWS[n]) | {"bpw": ROWS[n].bpw} for n in rows}, "results": records,
    })
    print(f"\nwrote {args.json} ({len(records)} results, {time.time() - t0:.1f} s)")
    return 0
