"""Training-step time: `--method odis` against `--method ibot` (same model, batch, views), odis's ibot step against
the same step written the reference way (8192-way head on every token of every view), and on a GPU the SDPA
backends for the masked attention, checked against the math backend.

    python benchmarks/step.py                       # CPU size: vit_tiny/8, 64-px globals, 6 x 32-px locals, K=1024, batch 64
    python benchmarks/step.py --preset gpu          # ViT-S/16, 2x224 + 10x96, K=8192, batch 64, bf16

Appends a row to BENCHMARKS.md and prints the ratios.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from odis.distill import Distiller, Views
from odis.losses import loss_obj, loss_patch, teacher_probs
from odis.choices import ATTN_IMPLS, DEFAULT_ATTN_IMPL

OBJ_ROW = {"efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}  # --obj-row choices

PRESETS = {
    "cpu": dict(arch="vit_tiny_patch16_224", patch=8, gsize=64, lsize=32, n_local=6, out_dim=1024, batch=64),
    "gpu": dict(arch="vit_small_patch16_224", patch=16, gsize=224, lsize=96, n_local=10, out_dim=8192, batch=64),
}


def make_views(p: dict, device: str, seed: int = 0) -> Views:
    g = torch.Generator().manual_seed(seed)
    b, gh = p["batch"], p["gsize"] // p["patch"]
    obj = torch.zeros(2, b, gh, gh, dtype=torch.bool)
    for i in range(b):  # a random box per sample and view
        y0, x0 = torch.randint(0, gh // 2, (2,), generator=g).tolist()
        obj[:, i, y0:y0 + gh // 2, x0:x0 + gh // 2] = True
    mim = torch.rand(2, b, gh, gh, generator=g) < 0.3
    mim[:, : b // 2] = False  # half the images unmasked, as iBOT
    v = Views(torch.randn(2 * b, 3, p["gsize"], p["gsize"], generator=g),
              torch.randn(p["n_local"] * b, 3, p["lsize"], p["lsize"], generator=g), obj,
              torch.ones(2, b, dtype=torch.bool), mim)
    return Views(*(t.to(device) if t is not None else None for t in (v.globals_, v.locals_, v.obj_mask,
                                                                   v.obj_valid, v.mim_mask)))


def reference_ibot_loss(d: Distiller, v: Views, temp: float) -> torch.Tensor:
    """iBOT's official way: the head on every token (CLS + all patches) of every view, globals and locals,
    for student and teacher; the loss then reads only CLS and masked global patches."""
    b = v.globals_.shape[0] // 2
    mim = v.mim_mask.flatten(0, 1)
    with torch.no_grad():
        t_cls, t_patch = d.teacher.backbone(v.globals_)
        t_all = d.teacher.head(torch.cat([t_cls[:, None], t_patch], 1))
    s_cls, s_patch = d.student.backbone(v.globals_, patch_mask=mim)
    s_all = d.student.head(torch.cat([s_cls[:, None], s_patch], 1))
    l_cls, l_patch = d.student.backbone(v.locals_)
    l_all = d.student.head(torch.cat([l_cls[:, None], l_patch], 1))  # patch outputs of locals: computed, unused
    s_obj = torch.cat([s_all[:, 0], l_all[:, 0]]).reshape(-1, b, s_all.shape[-1])
    tp = teacher_probs(t_all[:, 0], d.centers.obj, temp).reshape(2, b, -1)
    masked = mim.flatten(1)
    tpp = teacher_probs(t_all[:, 1:][masked], d.centers.patch, temp)
    return loss_obj(s_obj, tp, d.student_temp) + loss_patch(s_all[:, 1:][masked], tpp, masked.reshape(2, b, -1),
                                                           d.student_temp)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_methods(p: dict, device: str, attn_impl: str, warmup: int, iters: int,
                  profile_dir: str | None = None, compile: bool = False, reference: bool = True,
                  obj_rows: tuple[str, ...] = (), compile_mode: str | None = None) -> dict:
    """Median step time per variant. The variants are timed in turn, step by step (ABCABC...), so that a change in
    the machine's load during the run hits all of them alike. With `profile_dir`: then one profiled step of odis
    and of ibot each, their operator tables written there (where odis's extra time goes). `obj_rows`: more odis
    variants, `odis[<backend>]`, whose OBJ row may use only that SDPA backend."""
    views = make_views(p, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    steps = {}
    names = ("ibot", "odis") + (("ibot-reference",) if reference else ()) + tuple(f"odis[{b}]" for b in obj_rows)
    for name in names:
        torch.manual_seed(0)
        method = "ibot" if name.startswith("ibot") else "odis"
        d = Distiller(method, p["arch"], p["gsize"], p["patch"], out_dim=p["out_dim"], attn_impl=attn_impl)
        if name.startswith("odis["):
            d.student.backbone.obj_row_backends = d.teacher.backbone.obj_row_backends = (OBJ_ROW[name[5:-1]],)
        d.to(device)
        if compile:  # every variant alike; the warm-up steps compile
            d.compile_backbones(compile_mode)
        opt = torch.optim.AdamW(d.param_groups(), lr=1e-4)

        def step(d=d, opt=opt, name=name):
            if compile_mode == "reduce-overhead":  # CUDA graphs: each step's outputs are new ones
                torch.compiler.cudagraph_mark_step_begin()
            with amp:
                loss = reference_ibot_loss(d, views, 0.04) if name == "ibot-reference" else d(views, 0.04)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + iters):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    if profile_dir:
        profile_steps({k: steps[k] for k in ("odis", "ibot")}, device, Path(profile_dir))
    return {name: statistics.median(t) for name, t in times.items()}


def profile_steps(steps: dict, device: str, out: Path) -> None:
    """One step of each variant under torch.profiler: the top operators by self time, as text tables."""
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    for name, step in steps.items():
        with profile(activities=activities) as prof:
            step()
            _sync(device)
        (out / f"profile_{name}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
        print(f"profile of one {name} step -> {out / f'profile_{name}.txt'}")


def time_step(fn, device: str, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_sdpa_backends(p: dict) -> dict:
    """The masked forward under each SDPA backend (and the split OBJ row), compared with the math backend; and
    the same forward without the OBJ mask (flash attention: the floor any masked version is measured against)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from odis.model import OdisViT

    views = make_views(p, "cuda")
    model = OdisViT(p["arch"], p["gsize"], p["patch"]).cuda().eval()
    x, om = views.globals_, views.obj_mask.flatten(0, 1)
    out = {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel([SDPBackend.MATH]):
            ref = model(x, obj_mask=om)[0].float()
        cases = [("mask", b) for b in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")] + [("split", None)]
        model.attn_impl = "mask"
        out["unmasked:default"] = {"ms": round(time_step(lambda: model(x), "cuda", 3, 10) * 1e3, 3)}
        for impl, backend in cases:
            model.attn_impl = impl
            name = f"{impl}:{backend or 'default'}"
            ctx = sdpa_kernel([getattr(SDPBackend, backend)]) if backend else torch.autocast("cuda", torch.bfloat16)
            try:
                with ctx:
                    got = model(x, obj_mask=om)[0].float()
                    sec = time_step(lambda: model(x, obj_mask=om), "cuda", 3, 10)
                err = (got - ref).abs().max().item()
                out[name] = {"ms": round(sec * 1e3, 3), "max_abs_err_vs_math": err, "ok": err < 5e-2}
            except RuntimeError as e:  # a backend that refuses this mask/shape
                out[name] = {"error": str(e).splitlines()[0][:160]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn-impl", default=DEFAULT_ATTN_IMPL, choices=ATTN_IMPLS)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--machine", default=None, help="machine description for BENCHMARKS.md")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", default=None, metavar="DIR", help="also profile one odis and one ibot step and "
                    "write their operator tables to DIR")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbones of every variant "
                    "(the trainer's model.compile=true); the warm-up steps compile")
    ap.add_argument("--compile-mode", default=None, choices=["reduce-overhead", "max-autotune",
                                                            "max-autotune-no-cudagraphs"],
                    help="with --compile: torch.compile's mode (default: its default); reduce-overhead replays CUDA "
                    "graphs (a ViT-S step is launch-bound), max-autotune also tunes the matmuls (minutes)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference-way ibot step (with --compile: "
                    "a third less compiling)")
    ap.add_argument("--obj-row", action="append", default=[], choices=sorted(OBJ_ROW),
                    help="also time odis with its OBJ row (split attention) on this SDPA backend only; repeatable")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()
    preset = args.preset or ("gpu" if args.device == "cuda" else "cpu")
    p = dict(PRESETS[preset])
    if args.batch:
        p["batch"] = args.batch
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.compile_mode and not args.compile:
        ap.error("--compile-mode needs --compile")
    res = bench_methods(p, args.device, args.attn_impl, args.warmup, args.iters, args.profile, args.compile,
                       not args.no_reference, tuple(args.obj_row), args.compile_mode)
    ratio_mask = res["odis"] / res["ibot"]
    speedup = res["ibot-reference"] / res["ibot"] if "ibot-reference" in res else None
    summary = {"preset": preset, "params": p, "attn_impl": args.attn_impl, "compile": args.compile,
               "compile_mode": args.compile_mode,
               "device": args.device,
               "step_s": {k: round(v, 4) for k, v in res.items()},
               "odis_over_ibot": round(ratio_mask, 3), "reference_over_ours": speedup and round(speedup, 2),
               "img_per_s_odis": round(p["batch"] / res["odis"], 1),
               "obj_row_over_ibot": {b: round(res[f"odis[{b}]"] / res["ibot"], 3) for b in args.obj_row}}
    if args.device == "cuda":
        summary["sdpa"] = check_sdpa_backends(p)
    print(json.dumps(summary, indent=1))
    machine = args.machine or (torch.cuda.get_device_name() if args.device == "cuda"
                               else f"{torch.get_num_threads()}-thread CPU ({platform.machine()})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if not args.no_record:
        flags = f"--preset {preset} --attn-impl {args.attn_impl}" + (" --compile" if args.compile else "") \
            + (f" --compile-mode {args.compile_mode}" if args.compile_mode else "") \
            + (" --no-reference" if args.no_reference else "") + "".join(f" --obj-row {b}" for b in args.obj_row)
        obj_rows = "".join(f"OBJ row on {b}: {res[f'odis[{b}]']*1e3:.1f} ms (ratio {r:.3f}); "
                           for b, r in summary["obj_row_over_ibot"].items())
        row = (f"| {date.today()} | {machine} | `python benchmarks/step.py {flags}` | odis {res['odis']*1e3:.0f} ms "
               f"vs ibot {res['ibot']*1e3:.0f} ms per step "
               f"(ratio {ratio_mask:.3f}); "
               + (f"reference-way ibot {res['ibot-reference']*1e3:.0f} ms ({speedup:.2f}x slower than ours); "
                  if speedup else "") + obj_rows + f"batch {p['batch']}, {p['arch']}/{p['patch']}, "
               f"{p['gsize']}px x2 + {p['lsize']}px x{p['n_local']}, K={p['out_dim']} |\n")
        with open(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", "a") as f:
            f.write(row)


if __name__ == "__main__":
    main()
