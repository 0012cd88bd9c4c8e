"""The logging switch: STQ_LOGS (and TORCH_LOGS with the module name) show the pipeline's messages
at the chosen level, and nothing without them."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stq_compiler import logs
from stq_compiler.options import BackendOptions
from stq_compiler.pipeline import run_passes
from tests.conftest import capture_graphs, tiny_model

INFO_LINE = "stq_compiler.pipeline: [INFO] starquant: quantize_linears: +"
DEBUG_LINE = "stq_compiler.pipeline: [DEBUG] starquant: site model.transformer.blocks.0.{q_proj,k_proj,v_proj} (qkv)"

# torch.compile through the entry point, as a user would; stq_compiler is first imported by Dynamo.
SCRIPT = """
import torch
torch.manual_seed(0)
from stq_compiler.models import build_tiny
model = build_tiny("llada").eval()
ids = torch.randint(0, 255, (1, 8))
options = {"w_bits": 8, "a_bits": 8, "mask_token_id": 255, "inductor": False}
with torch.no_grad():
    torch.compile(model, backend="starquant", options=options)(ids)
print("done")
"""


def _run(env_update: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("STQ_LOGS", "TORCH_LOGS")}
    env.update(env_update)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    return proc.stderr


def test_parse_has_the_torch_logs_grammar():
    assert logs.parse("stq") == {"stq_compiler": logging.INFO}
    assert logs.parse("+stq") == {"stq_compiler": logging.DEBUG}
    assert logs.parse("-stq, +stq_compiler.pipeline") == {"stq_compiler": logging.ERROR, "stq_compiler.pipeline": logging.DEBUG}
    assert logs.parse("") == {}
    for bad in ("dynamo", "+", "stq;rm", "++stq", "torch.stq_compiler"):
        with pytest.raises(ValueError, match="STQ_LOGS: .* is not a setting"):
            logs.parse(bad)


@pytest.mark.parametrize("env,shown", [({}, False), ({"STQ_LOGS": "+stq"}, True)])
def test_stq_logs_env_var_is_read_when_stq_compiler_is_imported(env, shown):
    err = _run(env)
    assert (INFO_LINE in err) == shown and (DEBUG_LINE in err) == shown, err
    if shown:
        assert "starquant: passes of this graph:\n" in err  # the pass table, at DEBUG


def test_torch_logs_with_the_module_name_works_too():
    err = _run({"TORCH_LOGS": "+stq_compiler"})
    # torch's own handler and (glog-like) format; DEBUG reaches the site lines
    assert "starquant: quantize_linears: +" in err and "starquant: site model.transformer.blocks.0." in err, err


def test_a_bad_stq_logs_value_fails_on_import():
    env = {**os.environ, "STQ_LOGS": "+dynamo"}
    proc = subprocess.run([sys.executable, "-c", "import stq_compiler"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "STQ_LOGS: '+dynamo' is not a setting" in proc.stderr


@pytest.mark.parametrize("setting,info,debug", [("stq", True, False), ("+stq", True, True), ("-stq", False, False)])
def test_each_level_shows_what_it_should(setting, info, debug, capsys):
    """What STQ_LOGS=<setting> does at import, done in process: ``set_logs`` is the same code."""
    model = tiny_model("llada")
    opts = BackendOptions.from_dict({"w_bits": 8, "a_bits": 8, "mask_token_id": 255, "inductor": False})
    try:
        logs.set_logs(setting)
        (gm, inputs), = capture_graphs(model, torch.randint(0, 255, (1, 8)))
        run_passes(gm, inputs, opts)
        err = capsys.readouterr().err
        assert (INFO_LINE in err) == info and (DEBUG_LINE in err) == debug, err
    finally:
        logs.set_logs(None)
    (gm, inputs), = capture_graphs(model, torch.randint(0, 255, (1, 8)))
    run_passes(gm, inputs, opts)
    assert "starquant" not in capsys.readouterr().err  # undone
    assert logging.getLogger("stq_compiler").propagate and not logging.getLogger("stq_compiler").handlers
