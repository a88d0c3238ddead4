"""The command line on real inputs: a full quantize/eval run and every user mistake from the foundation issue."""

import json
import shutil
import subprocess
import sys


from conftest import STORIES
from vqmobile.cli import main

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
    assert res.returncode == 2 and res.stderr.strip().endswith("or one of smollm2, gemma3-270m") and "Traceback" not in res.stderr
