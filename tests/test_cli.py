"""The command line on real inputs: a full quantize/eval run, every user mistake from the foundation issue, the
checks that answer before torch loads, options after the subcommand, help texts and file modes.
(Tampered checkpoints and bundles: tests/test_bad_input.py.)"""

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import STORIES
from vqmobile.cli import METHODS, build_config, main, make_parser

SMALL = ["--nsamples", "4", "--seqlen", "128"]


def run_cli(capsys, *argv):
    rc = main([*map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_quantize_then_eval(tmp_path, capsys):
    out = tmp_path / "runs" / "ck"  # missing parent folders are created, as in README's `--out out/...`
    rc, stdout, _ = run_cli(capsys, "--quiet", "quantize", STORIES, "--method", "gptq", "--bits", "4", "--group", "32",
                            "--out", out, *SMALL)
    assert rc == 0 and f"wrote {out}" in stdout and "bits per weight" in stdout
    manifest = json.loads((out / "vqmobile.json").read_text())
    assert manifest["calibration"]["nsamples"] == 4 and manifest["config"]["bits"] == 4
    rc, stdout, _ = run_cli(capsys, "--quiet", "eval", out, "--windows", "3", "--json", tmp_path / "e.json")
    assert rc == 0 and "context 512, 3 of 1597 windows" in stdout
    assert json.loads((tmp_path / "e.json").read_text())["windows"] == 3


def _bad_dirs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    other_arch = tmp_path / "gpt2"
    shutil.copytree(STORIES, other_arch)
    cfg = json.loads((other_arch / "config.json").read_text())
    (other_arch / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    truncated = tmp_path / "truncated"
    shutil.copytree(STORIES, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    return empty, other_arch, truncated


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    empty, other_arch, truncated = _bad_dirs(tmp_path)
    out = tmp_path / "new" / "out"  # a failed run must not even leave the missing parent behind
    cases = [
        ([tmp_path / "missing", "--method", "rtn"], "does not exist"),
        ([STORIES / "config.json", "--method", "rtn"], "not a .gguf model"),
        ([empty, "--method", "rtn"], "not a causal LM directory"),
        ([other_arch, "--method", "rtn"], "unsupported architecture: gpt2"),
        ([truncated, "--method", "rtn"], "corrupt or truncated safetensors"),
        ([STORIES, "--method", "gptq", "--group", "32", "--calib", tmp_path / "nope.txt"], "calibration file"),
        ([STORIES, "--method", "rtn", "--bits", "9"], "--bits 9 is out of range"),
        ([STORIES, "--method", "rtn", "--group", "48"], "--group 48 is not supported"),
        ([STORIES, "--method", "gptq", "--group", "128"], "does not fit layer"),
        ([STORIES, "--method", "rtn", "--group", "32", "--out", STORIES / "config.json" / "ck"], "is not a folder"),
    ]
    for args, message in cases:
        rc, _, err = run_cli(capsys, "--quiet", "quantize", *args, *([] if "--out" in args else ["--out", out]), *SMALL)
        assert rc == 2, args
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "gpt2", "truncated"]


def test_quantizing_a_checkpoint_is_refused(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert run_cli(capsys, "--quiet", "quantize", STORIES, "--method", "rtn", "--group", "32", "--out", ck)[0] == 0
    rc, _, err = run_cli(capsys, "--quiet", "quantize", ck, "--method", "rtn", "--group", "32", "--out", tmp_path / "x")
    assert rc == 2 and "already a quantized checkpoint" in err and not (tmp_path / "x").exists()


def test_existing_output_is_not_clobbered(tmp_path, capsys):
    out = tmp_path / "ck"
    out.mkdir()
    rc, _, err = run_cli(capsys, "quantize", STORIES, "--method", "rtn", "--group", "32", "--out", out)
    assert rc == 2 and "already exists" in err


def test_eval_context_out_of_range(capsys):
    rc, _, err = run_cli(capsys, "--quiet", "eval", STORIES, "--ctx", "4096", "--windows", "1")
    assert rc == 2 and "--ctx 4096 is out of range" in err


def test_console_script_exit_code(tmp_path):
    res = subprocess.run([sys.executable, "-m", "vqmobile.cli", "eval", tmp_path / "missing"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1


# Each of these is answered before torch, transformers or ExecuTorch is imported (a typo in a second, not ten).
EARLY_MISTAKES = [
    (["eval", "{tmp}/missing"], "does not exist"),
    (["eval", str(STORIES), "--windows", "0"], "--windows 0 must be at least 1"),
    (["eval", str(STORIES), "--data", "{tmp}/nope.txt"], "evaluation file"),
    (["eval", str(STORIES), "--json", f"{STORIES}/config.json/e.json"], "is not a folder"),
    (["quantize", "{tmp}/missing.gguf", "--method", "rtn", "--out", "{tmp}/o"], "does not exist"),
    (["quantize", str(STORIES), "--method", "rtn", "--bpv", "2", "--out", "{tmp}/o"], "--bpv is an option of --method gptvq"),
    (["quantize", str(STORIES), "--method", "gptvq", "--bits", "3", "--out", "{tmp}/o"], "--bits is an option of"),
    (["quantize", str(STORIES), "--method", "gptq", "--calib", "{tmp}/nope.txt", "--out", "{tmp}/o"], "calibration file"),
    (["quantize", str(STORIES), "--method", "gptq", "--nsamples", "0", "--out", "{tmp}/o"], "at least 1 sample"),
    (["quantize", str(STORIES), "--method", "rtn", "--out", str(STORIES)], "already exists"),
    (["export", "./missing", "--target", "x86_64", "--out", "{tmp}/b"], "does not exist"),
    (["export", str(STORIES), "--target", "x86_64", "--format", "tflite", "--out", "{tmp}/b"], "unknown format tflite"),
    (["check", "{tmp}/missing"], "does not exist"),
    (["check", str(STORIES)], "is not a vqmobile bundle"),
    (["generate", "{tmp}/missing", "--prompt", "x"], "does not exist"),
]


def test_mistakes_are_answered_before_the_heavy_imports(tmp_path):
    code = (
        "import json, sys\n"
        "from vqmobile.cli import main\n"
        "out = []\n"
        f"for argv in json.loads(sys.argv[1]):\n"
        "    rc = main(argv)\n"
        "    out.append([rc, sorted(m for m in ('torch', 'transformers', 'executorch') if m in sys.modules)])\n"
        "print(json.dumps(out))\n"
    )
    cases = [[a.replace("{tmp}", str(tmp_path)) for a in argv] for argv, _ in EARLY_MISTAKES]
    res = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True, timeout=120)
    results = json.loads(res.stdout)
    errors = res.stderr.splitlines()
    assert len(errors) == len(EARLY_MISTAKES), res.stderr
    for (argv, message), (rc, heavy), line in zip(EARLY_MISTAKES, results, errors):
        assert rc == 2 and heavy == [], (argv, heavy)
        assert line.startswith("vqmobile: error: ") and message in line, (argv, line)
    assert list(tmp_path.iterdir()) == []


def test_global_options_work_after_the_subcommand():
    parser = make_parser()
    assert parser.parse_args(["check", "b", "--quiet"]).quiet is True
    assert parser.parse_args(["--quiet", "check", "b"]).quiet is True
    assert parser.parse_args(["check", "b"]).quiet is False
    assert parser.parse_args(["bench", "kernels", "--quick", "--quiet"]).quiet is True


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


@pytest.mark.parametrize("command", ["quantize", "eval", "export", "check", "generate", "bench kernels",
                                     "bench quality"])
def test_every_option_has_help(command):
    sub = dict(_subparsers(make_parser()))[command]
    undocumented = [a.dest for a in sub._actions if not a.help and not isinstance(a, argparse._HelpAction)]
    assert undocumented == [], command


def test_method_options_build_the_config():
    parser = make_parser()

    def config(*argv):
        return build_config(parser.parse_args(["quantize", "m", "--out", "o", *argv]))

    cfg = config("--method", "gptvq", "--bpv", "2.25", "--vq-dim", "4", "--no-codebook-update")
    assert (cfg.vq_dim, cfg.k, cfg.rows_per_block, cfg.codebook_update) == (4, 256, 128, False)
    cfg = config("--method", "gptvq", "--preset", "mobile", "--codebook", "fp16")
    assert (cfg.vq_dim, cfg.k, cfg.codebook) == (2, 64, "fp16")
    cfg = config("--method", "gptvq", "--bpv", "2.125", "--vq-dim", "1", "--svd-rank", "2", "--seed", "3")
    assert (cfg.k, cfg.cols_per_block, cfg.svd_rank, cfg.seed) == (4, 128, 2, 3)
    cfg = config("--method", "gptq", "--bits", "3", "--group", "64", "--act-order", "--embedding", "float")
    assert (cfg.bits, cfg.group, cfg.act_order, cfg.embedding) == (3, 64, True, "float")
    for name, method in METHODS.items():  # the CLI knows, before importing a method, whether it calibrates
        assert method.calibrated == type(config("--method", name)).needs_hessian, name


def test_outputs_respect_the_umask(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        out = tmp_path / "new" / "ck"
        rc, _, _ = run_cli(capsys, "--quiet", "quantize", STORIES, "--method", "rtn", "--group", "32", "--out", out)
        rc2, _, _ = run_cli(capsys, "--quiet", "eval", out, "--windows", "1", "--json", tmp_path / "j" / "e.json")
    finally:
        os.umask(old)
    assert rc == rc2 == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "new", out, *out.iterdir(),
                                                               tmp_path / "j", tmp_path / "j" / "e.json"]}
    assert modes.pop("new") == modes.pop("ck") == modes.pop("j") == 0o755
    assert set(modes.values()) == {0o644}, modes


def test_gptvq_below_the_floor_is_refused_and_below_two_bits_warned(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--quiet", "quantize", STORIES, "--method", "gptvq", "--bpv", "0.5",
                         "--out", tmp_path / "a", *SMALL)
    assert rc == 2 and "4D k=2" in err and "0.25 index bits per weight" in err and err.count("\n") == 1
    rc, out, err = run_cli(capsys, "--quiet", "quantize", STORIES, "--method", "gptvq", "--bpv", "1", "--em-iters", "3",
                           "--out", tmp_path / "b", *SMALL)
    assert rc == 0 and f"wrote {tmp_path / 'b'}" in out
    assert err.startswith("vqmobile: warning: GPTVQ 1 bpv = 4D k=8") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_bench_kernels_plot(tmp_path, capsys):
    png = tmp_path / "k.png"
    rc, out, _ = run_cli(capsys, "bench", "kernels", "--quick", "--threads", "1", "--kernels", "vq2.25,ort-int4-b32",
                         "--json", tmp_path / "k.json", "--plot", png)
    assert rc == 0 and f"# wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json", "k.png"]
