"""FSDP2 under torchrun on CPU (gloo): 2 ranks x grad_accum 1 == 1 process x grad_accum 2 (same global batch)."""
import json
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from model import load

ARGS = ["--model", "tiny", "--data", "demo", "--steps", "3", "--batch_size", "2", "--max_len", "96", "--lr", "3e-3",
        "--beta", "0.5", "--fmt", "plain", "--quiet", "--save_every", "0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_ranks_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, "repnoise.py", *ARGS, "--grad_accum", "2", "--out", str(one)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                        "repnoise.py", *ARGS, "--grad_accum", "1", "--out", str(two)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = [json.loads(x) for x in (one / "log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for k in ("loss", "stability", "noise", "ascent", "lens_ce", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-3, abs=1e-4), (x["step"], k)
    assert json.loads((two / "run.json").read_text())["resolved"]["world_size"] == 2
    # rank 0 saved a full (gathered) HF checkpoint that loads in a single process and equals the 1-process weights
    m1, _ = load(str(one))
    m2, _ = load(str(two))
    for (k, v), (k2, v2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v2, v, rtol=1e-3, atol=1e-4, msg=k)
