#!/usr/bin/env python
"""Soak run of IMSE: many batches through a tiny timm ViT with domain shifts and injected faults.

    python checks/soak.py                          # 10,000 batches of 8 (10-15 min on 2 CPU cores)
    python checks/soak.py --batches 1000 --out /tmp/soak.json
    python checks/soak.py --batches 50             # smoke run

It checks that a long stream stays healthy, not accuracy (the model is random-init and the images
synthetic): the input distribution changes every --shift-every batches (a cycle of noise, brightness,
contrast and blur domains, so domains recur and codes are retrieved), and a few known batches carry a
non-finite image (NaN pixel or +inf image) that IMSE must skip. The code bank is bounded
(--max-entries, --bank-policy) so that the bound is enforced many times.

Criteria (a PASS/FAIL line each; exit code 0 only when all pass):
  rss         resident memory (VmRSS, sampled every --sample-every batches) after the warm-up (first
              --warmup-frac of the batches) stays within --rss-tol of its value at the warm-up's end;
  bank_bound  the bank never holds more than max_entries entries (checked after every batch);
  bound_used  the bound was enforced (a drop or merge happened), when the run has enough domains;
  s_finite    every s is finite at every sample and at the end;
  skips       steps were skipped exactly at the injected batches (count and positions).
"""
import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

DOMAINS = ("clean", "noise0.5", "bright", "lowcontrast", "blur", "noise1.0+blur")


def rss_kb() -> int:
    """VmRSS of this process in kB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--depth", type=int, default=4, help="ViT depth (IMSE needs more than 3 blocks)")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--shift-every", type=int, default=200, help="batches per domain")
    ap.add_argument("--faults", default=None,
                    help="comma list of batch indices with a non-finite image (default: 4 spread over the run)")
    ap.add_argument("--max-entries", type=int, default=3, help="code bank bound (source entry included)")
    ap.add_argument("--bank-policy", default="merge_nearest", choices=["drop_oldest", "merge_nearest"])
    ap.add_argument("--sample-every", type=int, default=100, help="batches between RSS / s samples")
    ap.add_argument("--warmup-frac", type=float, default=0.1)
    ap.add_argument("--rss-tol", type=float, default=0.05, help="allowed RSS growth after the warm-up (fraction)")
    ap.add_argument("--progress-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: an OpenMP team on "
                    "shared cores stalls at barriers; 0 = torch's choice)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)
    if args.batches < 1:
        ap.error("--batches must be >= 1")
    n = args.batches
    if args.faults is None:
        faults = sorted({min(n - 1, max(1, int(n * f))) for f in (0.15, 0.42, 0.67, 0.93)}) if n >= 8 else []
    else:
        faults = sorted({int(v) for v in args.faults.split(",") if v.strip()})
        if any(not 0 <= b < n for b in faults):
            ap.error(f"--faults must lie in [0, {n})")
    args.fault_batches = faults
    args.sample_every = max(1, min(args.sample_every, max(1, n // 20)))
    return args


# ------------------------------------------------------------------------------------------------
# The stream

def base_images(b: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random images plus a little fine texture, roughly unit scale."""
    coarse = torch.randn(b, 3, max(size // 4, 1), max(size // 4, 1), generator=gen)
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return x + 0.2 * torch.randn(b, 3, size, size, generator=gen)


def apply_domain(x: torch.Tensor, domain: str, gen: torch.Generator) -> torch.Tensor:
    def blur(t):
        return F.avg_pool2d(F.avg_pool2d(t, 3, 1, 1, count_include_pad=False), 3, 1, 1, count_include_pad=False)

    if domain == "clean":
        return x
    if domain == "noise0.5":
        return x + 0.5 * torch.randn(x.shape, generator=gen)
    if domain == "bright":
        return x + 0.8
    if domain == "lowcontrast":
        return 0.3 * x
    if domain == "blur":
        return blur(x)
    if domain == "noise1.0+blur":
        return blur(x + 1.0 * torch.randn(x.shape, generator=gen))
    raise ValueError(domain)


def batch_at(i: int, args) -> tuple[torch.Tensor, str, str]:
    """Batch i of the stream (deterministic), its domain, and its fault kind ('' when none)."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
    domain = DOMAINS[(i // args.shift_every) % len(DOMAINS)]
    x = apply_domain(base_images(args.batch_size, args.img_size, gen), domain, gen)
    fault = ""
    if i in args.fault_batches:
        k = args.fault_batches.index(i)
        if k % 2 == 0:
            x[0, 0, 0, 0] = float("nan")  # one NaN pixel
            fault = "nan_pixel"
        else:
            x[-1] = float("inf")  # one all-inf image
            fault = "inf_image"
    return x, domain, fault


# ------------------------------------------------------------------------------------------------
# Run

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    import imse_kernels
    from imse_kernels import IMSE, IMSEConfig, _extension

    device = torch.device(args.device)
    info = {
        "imse_kernels": imse_kernels.__file__, "version": imse_kernels.__version__,
        "backends": imse_kernels.available_backends(), "extension_C": _extension.reason("_C") or "loaded",
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "threads": torch.get_num_threads(), "machine": platform.node(), "device": str(device),
    }
    print(f"imse_kernels {info['imse_kernels']}  backends {info['backends']}  extension _C: {info['extension_C']}")
    print(f"torch {info['torch']}  timm {info['timm']}  threads {info['threads']}  device {device}")

    torch.manual_seed(args.seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=args.num_classes,
                              img_size=args.img_size, patch_size=args.patch_size, depth=args.depth).to(device)
    cfg = IMSEConfig(max_entries=args.max_entries, bank_policy=args.bank_policy)
    adapter = IMSE(model, cfg)
    src_gen = torch.Generator().manual_seed(args.seed + 7)
    adapter.source_statistics([base_images(16, args.img_size, src_gen).to(device) for _ in range(4)])
    s0 = {n: m.s.detach().clone() for n, m in adapter.adapted.items()}
    print(f"IMSE on vit_tiny depth {args.depth} img {args.img_size}/{args.patch_size}: {len(adapter.layers)} spectral "
          f"layers, {len(adapter.adapted)} adapted; bank bound {args.max_entries} ({args.bank_policy}); "
          f"{args.batches} batches of {args.batch_size}, domain every {args.shift_every}; "
          f"faults at {args.fault_batches}")

    warm_end = max(1, int(round(args.batches * args.warmup_frac)))
    samples, skipped_at, fault_log = [], [], []
    bank_max, s_nonfinite_at = len(adapter.bank.entries), []
    rss_warm = None
    t0 = t_last = time.perf_counter()

    def s_state():
        finite = all(bool(torch.isfinite(m.s).all()) for m in adapter.layers.values())
        drift = max(float((m.s.detach() - s0[n]).abs().max()) for n, m in adapter.adapted.items())
        return finite, drift

    for i in range(args.batches):
        x, domain, fault = batch_at(i, args)
        before = adapter.skipped_steps
        s_before = {n: m.s.detach().clone() for n, m in adapter.adapted.items()} if fault else None
        adapter(x.to(device))
        if adapter.skipped_steps != before:
            skipped_at.extend([i] * (adapter.skipped_steps - before))
        if fault:
            unchanged = all(torch.equal(m.s.detach(), s_before[n]) for n, m in adapter.adapted.items())
            fault_log.append({"batch": i, "kind": fault, "domain": domain,
                              "skipped": adapter.skipped_steps - before, "s_unchanged": unchanged})
        bank_max = max(bank_max, len(adapter.bank.entries))
        done = i + 1
        if done % args.sample_every == 0 or done == warm_end or done == args.batches:
            finite, drift = s_state()
            if not finite:
                s_nonfinite_at.append(done)
            rss = rss_kb()
            if done == warm_end:
                rss_warm = rss
            samples.append({"batch": done, "rss_kb": rss, "bank": len(adapter.bank.entries),
                            "s_finite": finite, "s_drift": round(drift, 6), "skipped": adapter.skipped_steps,
                            "t_s": round(time.perf_counter() - t0, 2)})
        if done % args.progress_every == 0 or done == args.batches:
            now = time.perf_counter()
            rate = args.progress_every / (now - t_last) if done % args.progress_every == 0 else done / (now - t0)
            t_last = now
            print(f"[{done:>6}/{args.batches}] {rate:6.1f} batch/s  RSS {rss_kb() / 1024:7.1f} MiB  "
                  f"bank {len(adapter.bank.entries)}/{args.max_entries}  skipped {adapter.skipped_steps}  "
                  f"steps {adapter.steps_taken}  domain {domain}", flush=True)
    wall = time.perf_counter() - t0

    finite_end, drift_end = s_state()
    events = {}
    for e in adapter.events:
        events[e.kind] = events.get(e.kind, 0) + 1
    after = [s["rss_kb"] for s in samples if s["batch"] >= warm_end]
    rss_max = max(after) if after else None
    growth = (rss_max / rss_warm - 1.0) if rss_warm and rss_max else None
    n_domains = -(-args.batches // args.shift_every)
    need_bound = n_domains > args.max_entries + 1  # more domain changes than the bank can hold

    criteria = []

    def crit(name, ok, detail):
        criteria.append({"name": name, "status": "PASS" if ok is True else ("SKIP" if ok is None else "FAIL"),
                         "detail": detail})

    crit("rss", None if growth is None else growth <= args.rss_tol,
         f"RSS at warm-up end (batch {warm_end}) {rss_warm} kB, max after {rss_max} kB, growth "
         f"{'n/a' if growth is None else f'{growth * 100:.2f}%'} (limit {args.rss_tol * 100:.0f}%)")
    crit("bank_bound", bank_max <= args.max_entries, f"max bank size {bank_max}, bound {args.max_entries}")
    used = events.get("merge", 0) + events.get("drop", 0)
    crit("bound_used", (used > 0) if need_bound else None,
         f"{events.get('shift', 0)} shifts, {used} merges/drops over {n_domains} domains"
         + ("" if need_bound else " (too few domains to need the bound)"))
    crit("s_finite", finite_end and not s_nonfinite_at,
         f"s finite at the end: {finite_end}; non-finite at samples {s_nonfinite_at[:10]}; "
         f"max |s - s0| {drift_end:.4g}")
    expected = sorted(args.fault_batches)
    crit("skips", skipped_at == expected and all(f["s_unchanged"] for f in fault_log),
         f"skipped {len(skipped_at)} at {skipped_at[:20]}, injected {len(expected)} at {expected}; "
         f"s unchanged on fault batches: {all(f['s_unchanged'] for f in fault_log)}")

    ok = all(c["status"] != "FAIL" for c in criteria)
    report = {
        "info": info, "args": {k: v for k, v in vars(args).items()},
        "batches": args.batches, "wall_s": round(wall, 1), "batches_per_s": round(args.batches / wall, 2),
        "rss_warmup_kb": rss_warm, "rss_max_kb": rss_max,
        "rss_growth_pct": None if growth is None else round(growth * 100, 3),
        "bank_max": bank_max, "bank_bound": args.max_entries, "events": events,
        "skipped_steps": adapter.skipped_steps, "skipped_at": skipped_at, "injected": expected, "faults": fault_log,
        "steps_taken": adapter.steps_taken, "s_finite_end": finite_end, "s_drift_end": drift_end,
        "samples": samples, "criteria": criteria, "ok": ok,
    }
    print(f"done: {args.batches} batches in {wall:.1f} s ({args.batches / wall:.1f} batch/s); events {events}")
    for c in criteria:
        print(f"{c['status']} {c['name']}: {c['detail']}")
    print("SOAK", "PASS" if ok else "FAIL")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"report: {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
