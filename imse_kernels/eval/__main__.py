"""`imse-eval` / `python -m imse_kernels.eval`: Source vs Tent vs IMSE on a stream of corrupted domains.

With no arguments: the embedded default (scikit-learn's digits, a small timm ViT trained once and cached,
the 15 corruptions as a continual stream), on CPU, with no network. See `--help`.
"""
import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import distributed as dist_eval
from . import progress
from .corruptions import CORRUPTIONS, parse_corruptions
from .methods import METHODS, MethodOptions, build_method, parse_methods
from . import provenance as prov
from ..precision import check_autocast
from .metrics import shift_count, shift_detection
from .report import (aggregate, methods_payload, payload, plot, seeds_table, segments_payload, table, write_csv,
                     write_json)
from .runner import run_method
from .streams import (DEFAULT_DIRICHLET, DIRICHLET_SETTINGS, SETTING_HELP, SETTINGS, build_stream, true_boundaries)

#: Severity by default (ImageNet-C's usual). With CIFAR-10-C's constants scaled to the digits' content (corruptions.py,
#: scale 4) the cached ViT keeps 59% mean accuracy at 5 (74% at 3, 91% at 1, 97% clean): the 30-60% band.
DEFAULT_SEVERITY = 5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imse-eval", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=("digits", "imagenet-c"), default="digits",
                   help="digits: the embedded default; imagenet-c: a folder tree DIR/<corruption>/<severity>/<class>/")
    d.add_argument("--data-dir", help="ImageNet-C root (with --data imagenet-c)")
    d.add_argument("--source-dir", help="clean source images (ImageFolder) for IMSE's source statistics (imagenet-c); "
                                        "without it the code bank's source entry has no statistics")
    d.add_argument("--corruptions", default="all", help=f"comma-separated subset of: {', '.join(CORRUPTIONS)}")
    d.add_argument("--severity", type=int, default=DEFAULT_SEVERITY, help="1..5; the maximum in 'gradual'")
    d.add_argument("--n-test", type=int, default=512, help="digits: test images per domain")
    d.add_argument("--max-per-domain", type=int, default=None, help="imagenet-c: images per domain (same ones in each)")
    d.add_argument("--workers", type=int, default=0, help="imagenet-c: DataLoader workers")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="timm model name (needs --checkpoint); default: the embedded digits ViT")
    m.add_argument("--checkpoint", help="local weights file for --model (safetensors, .pth/.pt or timm's formats)")
    m.add_argument("--num-classes", type=int, default=None, help="classes of --checkpoint's head (default: timm's)")
    m.add_argument("--train-steps", type=int, default=None, help="digits: training steps of the embedded ViT")
    m.add_argument("--cache-dir", help="where the embedded model is cached (default $IMSE_KERNELS_CACHE or "
                                       "~/.cache/imse_kernels)")
    r = p.add_argument_group("run")
    settings_help = "; ".join(f"{k}: {v}" for k, v in SETTING_HELP.items())
    r.add_argument("--setting", choices=SETTINGS + ("multi_stream",), default="continual",
                   help=f"{settings_help}; multi_stream: --streams K streams, each its own order of the domains, in "
                        "mixed batches (MultiStreamIMSE against K separate IMSE adapters)")
    r.add_argument("--dirichlet", type=float, default=DEFAULT_DIRICHLET,
                   help=f"{' and '.join(DIRICHLET_SETTINGS)}: concentration gamma of the Dirichlet label sampling "
                        "(smaller: longer single-class runs)")
    r.add_argument("--streams", type=int, default=4, help="multi_stream: number of streams K")
    r.add_argument("--method", default="all", help=f"comma-separated, side by side on the same stream: "
                                                   f"{', '.join(METHODS)} (or all)")
    r.add_argument("--rounds", type=int, default=3, help="recurring: passes over the corruptions")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--seed", type=int, default=0, help="corruption noise, image order and adapters")
    r.add_argument("--seeds", default=None,
                   help="comma-separated seeds, e.g. 0,1,2: the whole comparison once per seed, reported as "
                        "mean ± std and min-max of each method's mean accuracy (replaces --seed)")
    r.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="autocast dtype (default: float32)")
    r.add_argument("--backend", default=None, help="spectral backend: auto, torch, cpu, triton, cuda")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--tent-lr", type=float, default=None, help="Tent learning rate (default: Tent's)")
    r.add_argument("--tent-optimizer", choices=("adam", "sgd"), default=None)
    r.add_argument("--imse-lr", type=float, default=None,
                   help="IMSE learning rate (default 7e-3; 3e-3 in the recurring setting, as the official configs)")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile forward + loss of Tent, the IMSE variants and MultiStreamIMSE (the first batch compiles)")
    r.add_argument("--dist-timeout", type=float, default=120.0,
                   help="under torchrun: seconds before a rank that died, stalled or never joined is an error")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default="imse_eval_out", help="results.json, results.csv, accuracy.png go here")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument("--no-plot", action="store_true")
    return p


_QUIET = False  # ranks other than 0 under torchrun


def _log(msg: str) -> None:
    if not _QUIET:
        print(msg, file=sys.stderr, flush=True)


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return dev


def _digits_setup(args):
    """(model, data for a seed, source batches, info, checkpoint file, model name); the model and the split do
    not depend on the seed, the corruptions do."""
    from .digits import load_splits
    from .embedded import CorruptedDigits
    from .models import EmbeddedConfig, load_or_train_embedded

    cfg = EmbeddedConfig(n_test=args.n_test)
    if args.train_steps is not None:
        cfg = replace(cfg, steps=args.train_steps)
    train, test = load_splits(n_test=cfg.n_test, seed=cfg.seed, size=cfg.img_size)
    model, info = load_or_train_embedded(cfg, train, test, args.cache_dir, log=_log)
    source = [train.images[i:i + args.batch_size] for i in range(0, len(train), args.batch_size)]
    probe = CorruptedDigits(test, seed=args.seed)
    info = {**info, "train_images": len(train), "test_images": len(test), "corruption_scale": probe.scale}
    seeds = {"embedded_model_training": cfg.seed, "test_split": cfg.seed}
    return (model, lambda seed: CorruptedDigits(test, seed=seed), source, info, info["cache"],
            f"embedded digits ViT (timm VisionTransformer, digits_vit_{cfg.key()})", seeds)


def _source_batches(source_dir: Optional[str], cfg: dict, batch_size: int, limit: int = 2048):
    if not source_dir:
        return None
    from .imagenet_c import ImageFolderDomain, _list_images, class_index

    root = Path(source_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--source-dir not found: {root}")
    rel = _list_images(root)
    if not rel:
        raise FileNotFoundError(f"no images under --source-dir {root} (expected <class>/<image>)")
    gen = torch.Generator().manual_seed(0)
    rel = [rel[i] for i in torch.randperm(len(rel), generator=gen)[:limit].tolist()]
    dom = ImageFolderDomain(root, rel, class_index(sorted({Path(r).parts[0] for r in rel})), cfg["input_size"][-1],
                            cfg.get("crop_pct", 1.0), cfg.get("interpolation", "bilinear"))
    return [x for x, _ in dom.batches(batch_size)]


def _imagenet_setup(args, corruptions: Sequence[str], severities: Sequence[int]):
    from .imagenet_c import ImageNetC
    from .models import load_timm_model

    if not args.data_dir:
        raise FileNotFoundError("--data imagenet-c needs --data-dir DIR (layout DIR/<corruption>/<severity>/<class>/...)")
    if not Path(args.data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"ImageNet-C directory not found: {args.data_dir}")
    if not args.model:
        raise ValueError("--data imagenet-c needs --model NAME --checkpoint FILE (e.g. vit_base_patch16_224)")
    model, cfg = load_timm_model(args.model, args.checkpoint, args.num_classes)

    def data_for(seed: int) -> ImageNetC:
        return ImageNetC(args.data_dir, corruptions, severities, cfg["input_size"][-1], cfg.get("crop_pct", 1.0),
                         cfg.get("interpolation", "bilinear"), args.max_per_domain, seed, args.workers)

    data = data_for(args.seed)
    head = getattr(model, "num_classes", None)
    if head is not None and data.num_classes > head:
        raise ValueError(f"the data has class index {data.num_classes - 1} but the model has {head} outputs")
    source = _source_batches(args.source_dir, cfg, args.batch_size)
    if source is None and any(m.startswith("imse") for m in parse_methods(args.method)):
        _log("note: no --source-dir; IMSE's code bank starts without source statistics")
    info = {"model": args.model, "checkpoint": str(args.checkpoint), "data_config": {k: cfg[k] for k in cfg}}
    cached = {args.seed: data}
    return (model, lambda seed: cached.pop(seed, None) or data_for(seed), source, info, args.checkpoint, args.model,
            {"source_subset": 0})


def parse_seeds(spec: Optional[str]) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (order kept, duplicates dropped)."""
    try:
        seeds = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {spec!r}") from None
    if not seeds:
        raise ValueError(f"--seeds takes comma-separated integers, got {spec!r}")
    return list(dict.fromkeys(seeds))


def _method_options(args, seed: int, comm=None) -> MethodOptions:
    kw = dict(process_group=None if comm is None else comm.group,
              tent_lr=args.tent_lr, tent_optimizer=args.tent_optimizer,
              imse_lr=args.imse_lr if args.imse_lr is not None else (3e-3 if args.setting == "recurring" else None),
              compile=args.compile)
    if "seed" in {f.name for f in dataclasses.fields(MethodOptions)}:  # methods that draw random numbers
        kw["seed"] = seed
    return MethodOptions(**kw)


def _labels(data) -> Optional[list]:
    labels = getattr(data, "labels", None)
    if labels is None and hasattr(data, "test"):
        labels = data.test.labels
    return None if labels is None else [int(y) for y in labels]


def _run_seed(args, seed: int, model, data, source, methods, corruptions, severity, domain_size, device, tag: str,
              comm=None):
    """One whole comparison: (stream, results, true boundaries or None, detection per method)."""
    from ..backends import use_backend
    from ..tta import IMSEConfig

    labels = _labels(data) if args.setting in DIRICHLET_SETTINGS else None
    stream = build_stream(args.setting, corruptions, severity, args.rounds, domain_size, args.batch_size, labels,
                          args.dirichlet, seed)
    domain_of = lambda seg: data.domain(seg.corruption, seg.severity)  # noqa: E731
    opts = _method_options(args, seed, comm)
    backend_ctx = use_backend(args.backend) if args.backend else contextlib.nullcontext()
    results = []
    with backend_ctx:
        for name in methods:
            torch.manual_seed(seed)
            adapter = build_method(name, model, opts, source)
            config = prov.method_config(adapter)
            if comm is not None:
                adapter = dist_eval.Sharded(adapter, comm)
            results.append(run_method(name, adapter, stream, domain_of, args.batch_size, device, args.amp,
                                      show_progress=not args.no_progress, config=config, label=name + tag))
            r = results[-1]
            _log(f"{name}{tag}: mean accuracy {100 * r.mean_accuracy:.1f}% ({r.images_per_s:.0f} images/s)")
            del adapter
    window = IMSEConfig().stats_window  # a shift shows once the detector's window holds new-domain images
    tolerance = max(1, math.ceil(window / args.batch_size))
    if stream.mixes_domains:
        boundaries = None
        detection = {r.method: (shift_count(r.shift_batches, r.stream_batches)
                                if r.shift_batches is not None else None) for r in results}
    else:
        boundaries = true_boundaries(results[0].batches, stream.segments)
        detection = {r.method: (shift_detection(r.shift_batches, boundaries, tolerance, r.stream_batches)
                                if r.shift_batches is not None else None) for r in results}
    return stream, results, boundaries, detection, tolerance


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation `args` describe; returns the results payload (also written to --output-dir)."""
    t_start = time.perf_counter()
    progress.ENABLED = not args.no_progress
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = parse_methods(args.method)
    corruptions = parse_corruptions(args.corruptions)
    severity = args.severity
    if not 1 <= severity <= 5:
        raise ValueError(f"--severity must be 1..5, got {severity}")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    dirichlet = getattr(args, "dirichlet", DEFAULT_DIRICHLET)
    if not dirichlet > 0:
        raise ValueError(f"--dirichlet must be > 0, got {dirichlet}")
    seeds = parse_seeds(args.seeds) if getattr(args, "seeds", None) else [args.seed]
    if args.setting == "multi_stream" and len(seeds) > 1:
        raise ValueError("--seeds applies to the single-stream settings; run multi_stream once per --seed")
    args.seed = seeds[0]
    device = _device(args.device)
    check_autocast(device, args.amp)  # refuses bf16/fp16 on a CPU that only emulates it (docs/design.md §14)
    comm = dist_eval.setup(args.dist_timeout, device)
    dist_eval.check_methods(methods, comm)
    if comm is not None:
        if args.setting == "multi_stream":
            raise ValueError("--setting multi_stream runs in one process (MultiStreamIMSE shards streams across ranks "
                             "through its process_group argument, not through imse-eval)")
        if comm.rank != 0:  # rank 0 alone reports
            progress.ENABLED = False
            global _QUIET
            _QUIET = True
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    severities = list(range(1, severity + 1)) if args.setting == "gradual" else [severity]

    if args.data == "digits":
        if args.model or args.checkpoint:
            if not args.checkpoint or not args.model:
                raise ValueError("--model and --checkpoint go together")
            raise ValueError("--model/--checkpoint apply to --data imagenet-c; the digits default uses its own ViT")
        model, data_for, source, info, checkpoint, model_name, fixed_seeds = _digits_setup(args)
        domain_size = args.n_test
    else:
        model, data_for, source, info, checkpoint, model_name, fixed_seeds = _imagenet_setup(args, corruptions,
                                                                                            severities)
        domain_size = None
    model = model.to(device).eval()
    if source is not None:
        source = [x.to(device) for x in source]
    uses_dirichlet = args.setting in DIRICHLET_SETTINGS

    def provenance(method_configs: dict, n_images: int) -> dict:
        return prov.collect(model=model_name, checkpoint=checkpoint, device=device, images_per_domain=n_images,
                            # run: corruption noise, image order and torch.manual_seed before each method
                            seeds={"run": seeds if len(seeds) > 1 else seeds[0], **fixed_seeds},
                            setting=args.setting, severity=severity, dirichlet=dirichlet if uses_dirichlet else None,
                            methods=method_configs, extra={"args": {k: v for k, v in vars(args).items()}})

    if args.setting == "multi_stream":
        data = data_for(seeds[0])
        n = len(data.test) if hasattr(data, "test") else len(data.relpaths)
        return _evaluate_multi_stream(args, model, data, source, info, corruptions, severity, device, t_start,
                                      lambda cfgs: provenance(cfgs, n))

    runs = []
    for seed in seeds:
        data = data_for(seed)
        if domain_size is None:
            domain_size = len(data.relpaths)
        tag = f" (seed {seed})" if len(seeds) > 1 else ""
        runs.append((seed, *_run_seed(args, seed, model, data, source, methods, corruptions, severity, domain_size,
                                      device, tag, comm)))
        del data
    stream, results, boundaries, detection, tolerance = runs[0][1:]
    record = provenance({r.method: r.config for r in results}, domain_size)
    opts0 = _method_options(args, seeds[0])
    meta = {
        "data": args.data, "setting": args.setting, "severity": severity, "corruptions": corruptions,
        "rounds": args.rounds if args.setting == "recurring" else None, "batch_size": args.batch_size,
        "seed": seeds[0], "amp": args.amp, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "backend": args.backend or os.environ.get("IMSE_BACKEND", "auto"),
        "device": str(device), "threads": torch.get_num_threads(), "methods": methods,
        "ranks": 1 if comm is None else comm.world_size,
        "tent_lr": opts0.tent_lr, "imse_lr": opts0.imse_lr, "compile": args.compile, "torch": torch.__version__,
        **info,
        "images_per_domain": domain_size,
        "dirichlet": dirichlet if uses_dirichlet else None,
        "stream_batches": results[0].stream_batches,
        "stream_sha256": stream.fingerprint(),
        "true_boundaries": boundaries,
        "detection_tolerance_batches": None if stream.mixes_domains else tolerance,
        "wall_seconds": None,
    }
    if len(seeds) > 1:
        meta["seeds"] = seeds
    if comm is not None and comm.rank != 0:
        return {"meta": meta}  # every rank scored the whole stream; rank 0 writes it once
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dir_note = f" · dirichlet {dirichlet:g}" if uses_dirichlet else ""
    if len(seeds) == 1:
        text = table(stream, results, detection)
        meta["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        data_out = payload(meta, stream, results, detection, record)
        write_csv(out / "results.csv", stream, results, seeds[0])
        plotted = results
        seed_note = f"seed {seeds[0]}"
    else:
        agg = aggregate([(s, rs, det) for s, _, rs, _, det, _ in runs])
        text = seeds_table(stream, agg)
        meta["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        data_out = {"meta": meta, "provenance": record, "segments": segments_payload(stream),
                    "runs": [{"seed": s, "stream_sha256": st.fingerprint(), "true_boundaries": b,
                              "methods": methods_payload(rs, det)} for s, st, rs, b, det, _ in runs],
                    "aggregate": agg}
        write_csv(out / "results.csv", stream, [], runs=[(s, rs) for s, _, rs, _, _, _ in runs])
        from types import SimpleNamespace

        plotted = [SimpleNamespace(method=m, accuracy=a["accuracy_per_segment"]["mean"],
                                   mean_accuracy=a["mean_accuracy"]["mean"], shift_batches=None, batches=r.batches)
                   for (m, a), r in zip(agg.items(), results)]
        seed_note = f"seeds {','.join(map(str, seeds))} (mean)"
    write_json(out / "results.json", data_out)
    plot_note = "disabled (--no-plot)" if args.no_plot else plot(
        out / "accuracy.png", stream, plotted,
        f"{args.data} · {args.setting}{dir_note} · severity {severity} · batch {args.batch_size} · {seed_note}")
    header = (f"{args.data} · {args.setting}{dir_note} · severity {severity} · {len(stream.segments)} segments · "
              f"{domain_size} images per domain · batch {args.batch_size} · {seed_note} · {device} · "
              f"{torch.get_num_threads()} threads"
              + (f" · data-parallel over {comm.world_size} ranks ({comm.backend})" if comm is not None else ""))
    if "clean_test_accuracy" in info:
        header += f"\nembedded ViT: clean test accuracy {100 * info['clean_test_accuracy']:.1f}% ({info['cache']})"
    header += "\n" + prov.summary_line(record)
    print(header)
    print(text)
    if stream.mixes_domains:
        print("shift detection: a mixed stream has no domain boundaries; the table counts the declared shifts")
    else:
        print(f"shift detection: {len(boundaries)} true boundaries, a declared shift counts within {tolerance} "
              "batch(es) of one; delay = batches from the boundary to the matched detection; false positives = "
              "unmatched detections")
    files = ["results.json", "results.csv"] + ([] if plot_note else ["accuracy.png"])
    print(f"wrote {', '.join(str(out / f) for f in files)}" + (f"; PNG: {plot_note}" if plot_note else ""))
    print(f"wall time {meta['wall_seconds']:.1f} s")
    data_out["table"] = text
    return data_out


def _evaluate_multi_stream(args, model, data, source, info, corruptions, severity, device, t_start,
                           provenance=None) -> dict:
    """`--setting multi_stream`: MultiStreamIMSE against K separate IMSE adapters on the same K streams."""
    from .multi_stream import multi_stream_table, run_multi_stream
    from ..backends import use_backend
    from ..tta import IMSEConfig

    config = IMSEConfig(**({"lr": args.imse_lr} if args.imse_lr is not None else {}))
    torch.manual_seed(args.seed)
    with use_backend(args.backend) if args.backend else contextlib.nullcontext():
        orders, results = run_multi_stream(model, lambda c: data.domain(c, severity), corruptions, args.streams,
                                           args.batch_size, device, config, source, args.seed,
                                           show_progress=not args.no_progress, compile=args.compile)
    text = multi_stream_table(orders, results)
    meta = {"data": args.data, "setting": "multi_stream", "streams": args.streams, "severity": severity,
            "corruptions": corruptions, "batch_size_per_stream": args.batch_size, "seed": args.seed,
            "compile": args.compile,
            "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "imse_config": dataclasses.asdict(config), **info,
            "wall_seconds": round(time.perf_counter() - t_start, 1)}
    record = None if provenance is None else provenance(
        {m: {"class": "MultiStreamIMSE" if m == "multi_stream" else "IMSE", "config": prov.jsonable(config),
             "streams": args.streams if m == "multi_stream" else 1} for m in ("multi_stream", "separate")})
    data_out = {"meta": meta, **({"provenance": record} if record else {}), "orders": orders, "methods": {r.method: {
        "accuracy": r.accuracy, "correct": r.correct, "total": r.total, "mean_accuracy": r.mean_accuracy,
        "seconds": r.seconds, "images_per_s": r.images_per_s, "max_logit_diff": r.max_logit_diff} for r in results},
        "table": text}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", data_out)
    print(f"{args.data} · multi_stream · K={args.streams} streams · severity {severity} · {args.batch_size} images "
          f"per stream per batch · seed {args.seed} · {device} · {torch.get_num_threads()} threads")
    if record:
        print(prov.summary_line(record))
    print(text)
    print(f"wrote {out / 'results.json'}")
    print(f"wall time {meta['wall_seconds']:.1f} s")
    return data_out


def _reexec_with_passive_openmp() -> None:
    """From the command line, restart once with OMP_WAIT_POLICY=PASSIVE (read only when OpenMP loads).

    With OpenMP's default spin-waiting, torch's CPU threads collapse when another process shares the cores
    (measured on 2 shared cores: an IMSE step 0.3 s with 1 thread, 9.7 s with 2 spinning threads,
    0.38 s with 2 passive ones). Set OMP_WAIT_POLICY yourself to skip this.
    """
    if "OMP_WAIT_POLICY" in os.environ or torch.cuda.is_available():
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "imse_kernels.eval", *sys.argv[1:]], env)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the exit status (2 for a usage or missing-file error).

    `argv` None means the command line (then OpenMP may be restarted in passive mode, see above)."""
    if argv is None:
        _reexec_with_passive_openmp()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        evaluate(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"imse-eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
