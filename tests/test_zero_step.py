"""dsfleet.zero_step on real DeepSpeed ZeRO-2 ranks (2 CPU processes, bf16, gloo): the multi-tensor gradient
checks make DeepSpeed take the same decisions as its own per-tensor ones — the same losses and weights with
clipping active and inactive, and a step whose gradient holds a NaN on one rank is skipped on both."""
from __future__ import annotations

import json
import math

import pytest

from tests.launch import REPO, cpu_env, deepspeed_train, explain

PROBE = str(REPO / "tests" / "zero_step_probe.py")


def probe(fused: bool, clip: float, nan_step: int, norm: bool = True) -> dict:
    env = cpu_env(FUSED="1" if fused else "0", CLIP=str(clip), NAN_STEP=str(nan_step), NORM="1" if norm else "0",
                  PYTHONPATH=str(REPO / "src"))
    proc = deepspeed_train([], ranks=2, env=env, script=PROBE, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, explain(proc)
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("clip", [0.05, 1e6], ids=["clipping", "no_clipping"])
def test_same_steps_as_deepspeeds_own_checks(clip):
    own, fused = probe(False, clip, nan_step=2), probe(True, clip, nan_step=2)
    assert own["checks_from"].startswith("deepspeed") and fused["checks_from"] == "dsfleet.zero_step", fused
    assert fused["why_not"] is None
    # the NaN step is skipped by both ranks, with either check, and nothing non-finite reaches the weights
    assert own["skipped"] == fused["skipped"] == 1
    assert all(math.isfinite(v) for p in fused["params"] for v in p)
    finite = [n for i, n in enumerate(own["norms"]) if i != 2]
    assert (max(finite) > clip) if clip < 1 else (max(finite) < clip), own["norms"]  # the branch under test ran
    assert fused["losses"] == pytest.approx(own["losses"], rel=1e-6)
    for a, b in zip(fused["params"], own["params"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_the_overflow_check_alone_skips_the_nan_step():
    """No gradient norm computed (zero_optimization.compute_grad_norm false, no clipping): the non-finite check is
    the only guard — with the norm on, DeepSpeed's invalid-norm test would catch a NaN step as well."""
    own, fused = probe(False, 0.0, nan_step=2, norm=False), probe(True, 0.0, nan_step=2, norm=False)
    assert own["skipped"] == fused["skipped"] == 1
    assert all(math.isfinite(v) for p in fused["params"] for v in p)
    assert fused["losses"] == pytest.approx(own["losses"], rel=1e-6)


def test_without_a_nan_nothing_is_skipped():
    assert probe(True, 1.0, nan_step=-1)["skipped"] == 0
