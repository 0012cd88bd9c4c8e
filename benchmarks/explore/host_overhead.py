"""Probe (GPU): where the host time of a quantized step goes without CUDA graphs.

In ``mode="default"`` the STaR-Quant W4A4 step at LLaDA-8B, 1 x 1024 took 70.9 ms on the H200
against 20.9 with CUDA graphs (README "Speed"): the GPU waits for the host. This probe compiles
that model with ``StarQuant(mode="default")`` (a recipe as ``benchmarks/speed.py`` makes one) and
reports:

* ``step``: per step, the wall time with a synchronisation at the end and the host time to issue
  the step (the call returning before the GPU finishes), median of ``--steps`` calls;
* ``profile``: cProfile of ``--profile-steps`` steps, the functions with the most own time
  (``tottime``) and the most inclusive time (``cumtime``), per step;
* ``parts`` (``--parts``, no model): LLaDA-8B's q/k/v site at 1024 tokens and its q/k/v GEMM,
  host microseconds a call of each layer: the op through the dispatcher, the launcher
  (``triton_fused.*_triton``), the launcher with Triton's launch stubbed out, three ``torch.empty``;
* ``conditions`` (``--conditions``): the step's host and wall time again under what
  ``benchmarks/speed.py`` does around its timed calls, one thing at a time and then together:
  ``set_stance("fail_on_recompile")``, the float weights given back (as the benchmark does),
  the benchmark's own timing (``speed.time_calls``: CUDA events), and all three (session 13: at 4 x 1024 the benchmark's default-mode row took
  113.9 ms where this probe's step took 82.3 in the same lease);
* ``ops``: per call, host microseconds of each ``stq`` custom op at one site of the graph (the
  first of each kind the step launches, captured with its arguments), called ``--op-calls`` times
  without synchronising: through the dispatcher (``torch.ops.stq.*``), and straight into the
  Triton launcher (``triton_fused.*_triton``).

Results: ``benchmarks/results/explore-host-overhead-h200.json`` (session 11's code, a key-cached
launch path tried and dropped, and the kept tree: the CUDA kernels registered with the dispatcher
directly, ``codegen/dispatch.py``).

    PYTHONPATH=. python benchmarks/explore/host_overhead.py --out $OUT/host-overhead.json
    PYTHONPATH=. python benchmarks/explore/host_overhead.py --parts --op-calls 500 --out $OUT/host-parts.json
    PYTHONPATH=. python benchmarks/explore/host_overhead.py --shape 4x1024 --conditions --out $OUT/host-conditions.json
    python benchmarks/explore/host_overhead.py --tiny --shape 1x64 --out h.json   # CPU: the flow only
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import speed  # noqa: E402

from stq_compiler import StarQuant  # noqa: E402
from stq_compiler.codegen import triton_fused  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_and_wall(fn, steps: int) -> dict:
    issue, wall = [], []
    for _ in range(steps):
        sync()
        clock = time.perf_counter()
        fn()
        issued = time.perf_counter()
        sync()
        done = time.perf_counter()
        issue.append((issued - clock) * 1e3)
        wall.append((done - clock) * 1e3)
    return {"issue_ms": statistics.median(issue), "wall_ms": statistics.median(wall), "steps": steps}


def conditions(fn, bench, sargs, steps: int) -> list[dict]:
    """The step's times under each of speed.py's conditions, then all of them; its timing is
    ``speed.time_calls`` itself (CUDA events on a GPU, with ``host_issue_ms``)."""
    from stq_compiler import release

    stance = lambda: torch.compiler.set_stance("fail_on_recompile")  # noqa: E731
    rows = []

    def row(what, measure):
        rows.append({"condition": what, **measure()})
        print(f"{what:40s} {rows[-1]}", flush=True)

    def as_speed_times():
        host = {}
        times = speed.time_calls(fn, sargs, sargs.seconds, host=host)
        return {"speed_ms": statistics.median(times), "calls": len(times), **host}

    row("plain", lambda: host_and_wall(fn, steps))
    with stance():
        row("set_stance('fail_on_recompile')", lambda: host_and_wall(fn, steps))
    row("speed.time_calls", as_speed_times)
    bench.released.release([t for _, t in release.releasable(bench.model)])
    try:
        row("float weights given back", lambda: host_and_wall(fn, steps))
        with stance():
            row("all: given back, stance, host and wall", lambda: host_and_wall(fn, steps))
            row("all: given back, stance, speed.time_calls", as_speed_times)
    finally:
        bench.released.restore()
    return rows


def profile_rows(fn, steps: int, top: int) -> dict:
    prof = cProfile.Profile()
    sync()
    prof.enable()
    for _ in range(steps):
        fn()
    sync()
    prof.disable()
    out = {}
    for key in ("tottime", "cumtime"):
        stats = pstats.Stats(prof, stream=io.StringIO()).sort_stats(key)
        rows = []
        for func in stats.fcn_list[:top]:
            cc, nc, tt, ct, _ = stats.stats[func]
            rows.append({"function": f"{Path(func[0]).name}:{func[1]}:{func[2]}", "calls_per_step": nc / steps,
                         "tottime_ms_per_step": tt * 1e3 / steps, "cumtime_ms_per_step": ct * 1e3 / steps})
        out[key] = rows
    return out


class Capture:
    """The first call of each ``stq`` launcher a step makes, with its arguments, and the number of
    calls (the launchers wrapped where the registered CUDA kernels look them up; TAC's site
    counts twice, its call and the one it makes after TAC's kernel)."""

    def __init__(self):
        self.calls: dict[str, tuple] = {}
        self.counts: dict[str, int] = {}

    def wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            tac = name == "fused_quantize" and (kwargs.get("tac_m") if len(args) <= 4 else args[4]) is not None
            key = f"{name}+tac" if tac else name
            self.counts[key] = self.counts.get(key, 0) + 1
            self.calls.setdefault(key, (args, kwargs))
            return fn(*args, **kwargs)
        return wrapped


def op_host_us(calls: dict, n: int) -> list[dict]:
    rows = []
    for key, (args, kwargs) in calls.items():
        name = key.split("+")[0]
        for path, fn in (("dispatcher", getattr(torch.ops.stq, name)),
                         ("launcher", getattr(triton_fused, f"{name}_triton"))):
            fn(*args, **kwargs)
            sync()
            clock = time.perf_counter()
            for _ in range(n):
                fn(*args, **kwargs)
            host = (time.perf_counter() - clock) / n * 1e6
            sync()
            rows.append({"op": key, "path": path, "host_us_per_call": host})
            print(f"{key:24s} {path:10s} {host:8.1f} us a call", flush=True)
    return rows


def per_call_us(fn, n: int) -> float:
    fn()
    sync()
    clock = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - clock) / n * 1e6
    sync()
    return host


def parts(n: int) -> list[dict]:
    from quantize_loop import site_inputs
    from triton.runtime.jit import JITFunction

    from stq_compiler import fused_ops, ops

    x, common, _, _ = site_inputs(1024, 4096, (64, 64), "cuda")
    triton_fused.prepare_factor_splits(common["p1"], common["p2"])
    kw = dict(rms_eps=1e-5, **common)
    w = fused_ops.pack_weight(ops.quantize_weight(torch.randn(3 * 4096, 4096, device="cuda") * 0.02, bits=4))
    q, sc, ze = triton_fused.fused_quantize_triton(x, 4, **kw, pack=False)
    linear_args = (q, sc, ze, w.q, w.scale, w.w_sum, None, None, False, torch.float16)
    rows = []

    def row(what, fn):
        rows.append({"part": what, "host_us_per_call": per_call_us(fn, n)})
        print(f"{what:60s} {rows[-1]['host_us_per_call']:8.1f} us a call", flush=True)

    for site, op, launcher, a, k in (
        ("q/k/v quantize", torch.ops.stq.fused_quantize, triton_fused.fused_quantize_triton, (x, 4), {**kw, "pack": False}),
        ("q/k/v GEMM", torch.ops.stq.fused_linear, triton_fused.fused_linear_triton, linear_args, {}),
    ):
        with torch.no_grad():
            row(f"{site}: op through the dispatcher (no_grad)", lambda: op(*a, **k))
        with torch.inference_mode():
            row(f"{site}: op through the dispatcher (inference_mode)", lambda: op(*a, **k))
        row(f"{site}: launcher", lambda: launcher(*a, **k))
        run = JITFunction.run
        JITFunction.run = lambda self, *la, grid, warmup, **lk: None  # kernel[grid](...) launches nothing
        try:
            row(f"{site}: launcher, Triton's launch stubbed out", lambda: launcher(*a, **k))
        finally:
            JITFunction.run = run
    row("three torch.empty", lambda: (torch.empty((1024, 4096), dtype=torch.int8, device="cuda"),
                                      torch.empty(1024, device="cuda"), torch.empty(1024, dtype=torch.int32, device="cuda")))
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=speed.MODELS, default="llada")
    p.add_argument("--shape", default="1x1024")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--op-calls", type=int, default=200)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--recipe-dir", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU: the script's flow only")
    p.add_argument("--parts", action="store_true", help="only the per-layer costs at one site (no model)")
    p.add_argument("--conditions", action="store_true", help="also the step under speed.py's timing conditions")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.parts:
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "parts": parts(args.op_calls)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        return result
    sargs = speed.parse_args(["--models", args.model, "--shapes", args.shape, "--out", str(args.out)]
                             + (["--recipe-dir", str(args.recipe_dir)] if args.recipe_dir else [])
                             + (["--tiny"] if args.tiny else []))
    batch, tokens = sargs.shapes[0]
    bench = speed.Bench(args.model, sargs)
    recipe, _ = bench.recipe(4, 4, False)
    x = bench.inputs(batch, tokens)
    result = {"device": torch.cuda.get_device_name() if sargs.cuda else "cpu", "torch": torch.__version__, "model": args.model,
              "shape": args.shape}

    fn = torch.compile(bench.model, backend=StarQuant(mode="default", recipe=recipe), dynamic=False)
    capture = Capture()
    with torch.no_grad():
        fn(x)
        launchers = {name: getattr(triton_fused, f"{name}_triton") for name in ("fused_quantize", "fused_linear")}
        for name, fn_ in launchers.items():  # count and capture one step's calls
            setattr(triton_fused, f"{name}_triton", capture.wrap(name, fn_))
        fn(x)
        sync()
        for name, fn_ in launchers.items():
            setattr(triton_fused, f"{name}_triton", fn_)
        result["ops_per_step"] = dict(capture.counts)
        print("ops a step:", capture.counts, flush=True)
        step = lambda: fn(x)  # noqa: E731
        result["step"] = host_and_wall(step, args.steps)
        print("step:", result["step"], flush=True)
        if args.conditions:
            result["conditions"] = conditions(step, bench, sargs, args.steps)
        result["profile"] = profile_rows(step, args.profile_steps, args.top)
        for row in result["profile"]["tottime"][:25]:
            print(f"{row['tottime_ms_per_step']:8.2f} ms {row['calls_per_step']:7.0f}x  {row['function']}")
        print("cumulative:")
        for row in result["profile"]["cumtime"][:25]:
            print(f"{row['cumtime_ms_per_step']:8.2f} ms {row['calls_per_step']:7.0f}x  {row['function']}")
        result["ops"] = op_host_us(capture.calls, args.op_calls)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
