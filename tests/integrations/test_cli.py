"""The ``hyperpass run`` command on an unmodified script (tests/scripts/tiny_attention_model.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hyperpass.integrations import cli

SCRIPT = Path(__file__).parent / "scripts" / "tiny_attention_model.py"
PAPER = ["--method", "hyper", "--window", "0", "--sinks", "0"]  # the paper's algorithm
EXACT = [*PAPER, "--min-len", "16", "--block-size", "128", "--min-seq-len", "128"]
APPROX = [
    *PAPER,
    "--min-len",
    "16",
    "--block-size",
    "16",
    "--sample-size",
    "16",
    "--min-seq-len",
    "16",
]


def _run(argv, cwd):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.pt"
    done = _run([str(SCRIPT), str(out)], out.parent)
    assert done.returncode == 0, done.stderr
    return torch.load(out)


def test_python_m_hyperpass_run_patches_an_unmodified_script(tmp_path, reference):
    out = tmp_path / "out.pt"
    done = _run(["-m", "hyperpass", "run", *APPROX, str(SCRIPT), str(out), "--seq", "64"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout  # the script's own output and arguments
    assert "1 model(s) patched" in done.stderr
    assert "TinyModel: 3 eager calls: 3 approximated, 0 exact" in done.stderr
    assert not torch.allclose(torch.load(out), reference, atol=1e-3)


def test_run_in_process_exact_settings_and_restore(tmp_path, reference, capsys):
    call = nn.Module.__call__
    argv = sys.argv[:]
    out = tmp_path / "out.pt"
    code = cli.main(["run", *EXACT, "--last-n-layers", "2", str(SCRIPT), str(out)])
    assert code == 0
    torch.testing.assert_close(torch.load(out), reference)
    err = capsys.readouterr().err
    assert "layers.1: 1 eager calls: 1 approximated" in err
    assert "layers.0" not in err
    assert nn.Module.__call__ is call and sys.argv == argv


def test_run_under_the_scripts_own_torch_compile(tmp_path, reference, capsys):
    out = tmp_path / "out.pt"
    code = cli.main(["run", *EXACT, str(SCRIPT), str(out), "--compile"])
    assert code == 0
    torch.testing.assert_close(torch.load(out), reference)
    assert "TinyModel: traced 3x by torch.compile: 3 routed to the op" in capsys.readouterr().err


def test_run_returns_the_scripts_exit_status(tmp_path, capsys):
    code = cli.main(["run", *APPROX, str(SCRIPT), str(tmp_path / "o.pt"), "--exit-code", "3"])
    assert code == 3
    assert "3 approximated" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["run", "--block-size", "17", str(SCRIPT)], "block_size must be a multiple of 16"),
        (["run", "--method", "nope", str(SCRIPT)], "invalid choice"),
        (["run", "--layers", "a", "--last-n-layers", "1", str(SCRIPT)], "not both"),
        (["run", "--inner", "aot_eager", str(SCRIPT)], "--inner is only used"),
        (["run", "missing_script.py"], "not found"),
    ],
)
def test_run_rejects_bad_options(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_version(capsys):
    import hyperpass

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"hyperpass {hyperpass.__version__}"
