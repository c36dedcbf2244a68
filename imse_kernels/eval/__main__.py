"""`imse-eval` / `python -m imse_kernels.eval`: compare test-time adaptation methods on corrupted-domain streams.

With no arguments: the embedded default (scikit-learn's digits, a small timm ViT trained once and cached, the 15
corruptions as a continual stream) on the CPU, with no network. Stages: check (`eval.run_config`), set-up
(`eval.session`), run (`eval.runner`), report (`eval.report`); a bad option, key, value or file prints one line and
exits with status 2. docs/design.md, sections 12 and 13.
"""
import argparse
import contextlib
import os
import sys
import time
from typing import Optional, Sequence

import torch

from ..backends import use_backend
from ..precision import SlowAutocastError
from ..tta import IMSE, ConfigError, registry
from . import progress
from .corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS
from .data_spec import DATA_SOURCES, images_per_domain, spec_from_run
from .errors import DataError
from .imagenet_c import SUBSET_HELP, SUBSETS
from .images import SCAN_MODES
from .methods import METHODS, MethodOptions, parse_methods
from .multi_stream import evaluate_multi_stream
from .preprocess import DEFAULT_PREPROCESS, PREPROCESS, PREPROCESS_HELP
from .protocol import REPORTS
from .report import ResultsWriter
from .run_config import RUN, Invocation, Plan, layer, load_config_file, parse_assignment, parse_pairs, resolve
from .runner import run_seed
from .session import Session, set_up
from .streams import DEFAULT_DIRICHLET, DIRICHLET_SETTINGS, SETTING_HELP, SETTINGS
from .usage import UsageError

#: Severity by default (ImageNet-C's usual). With CIFAR-10-C's constants scaled to the digits' content (corruptions.py,
#: scale 4) the cached ViT keeps 59% mean accuracy at 5 (74% at 3, 91% at 1, 97% clean): the 30-60% band.
DEFAULT_SEVERITY = 5
OMP_WAIT_POLICIES = ("auto", "passive", "active", "inherit")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are `UsageError`s (main prints them and returns 2)."""

    def error(self, message: str):
        raise UsageError(message)


def seed_list(spec: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (order kept, duplicates dropped)."""
    try:
        seeds = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {spec!r}")
    return list(dict.fromkeys(seeds))


def method_list(spec: str) -> list[str]:
    """'all' or comma-separated registered method names."""
    try:
        return parse_methods(spec)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def corruption_list(spec: str) -> list[str]:
    """'all' or comma-separated corruption names (checked against the data set: the 15 made for digits, the
    folder's for data read from disk)."""
    names = list(dict.fromkeys(s.strip() for s in str(spec).split(",") if s.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"--corruptions takes 'all' or comma-separated names, got {spec!r}")
    return names


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The options; with `defaults=False` an option that is not given is absent from the result (which options
    were given explicitly: they replace the config file's values)."""
    p = _Parser(prog="imse-eval", description=__doc__.split("\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                epilog="Config files: --config FILE.yaml (sections `run` and one per method, keys = the dataclass "
                       "fields; configs/ has the authors' settings), then the options given here, then --set "
                       "KEY=VALUE and trailing KEY VALUE pairs. docs/design.md, section 12.")

    def add(group, *flags, **kw):
        if not defaults:
            kw["default"] = argparse.SUPPRESS
        group.add_argument(*flags, **kw)

    c = p.add_argument_group("config")
    add(c, "--config", "--cfg", default=None, metavar="FILE",
        help="a YAML config file (configs/) or a results.json to run again; the options below replace its values")
    add(c, "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one key, e.g. --set sar.lr=5e-4 or --set run.batch_size=32 (repeatable); every field of "
             f"every method's config is a key: sections run, {', '.join(registry.names())}")
    add(c, "overrides", nargs="*", default=[], metavar="KEY VALUE",
        help="yacs-style overrides after the options, e.g. `sar.lr 5e-4 imse.retrieval mix`")
    d = p.add_argument_group("data")
    add(d, "--data", choices=DATA_SOURCES, default=None,
        help="digits (when not given): the embedded default; imagenet-c: a folder tree "
             "DIR/<corruption>/<severity>/<class>/<image>; cifar10-c, cifar100-c: RobustBench's .npy files "
             "(DIR/<corruption>.npy and labels.npy, or DIR/CIFAR-10-C/...)")
    add(d, "--data-dir", help="the data set's folder (with --data imagenet-c, cifar10-c or cifar100-c)")
    add(d, "--source-dir", help="clean source images (ImageFolder) for EATA's Fisher and IMSE's source statistics "
                                "(imagenet-c); without it they run without clean source data")
    add(d, "--corruptions", type=corruption_list, default=None,
        help="comma-separated names or all. digits: any of the 15 made here (all: the 15: "
             f"{', '.join(CORRUPTIONS)}); data on disk: any corruption folder or .npy name present, ImageNet-C's "
             f"extra {', '.join(EXTRA_CORRUPTIONS)} included; all: every one present. None given: the 15")
    add(d, "--severity", type=int, default=DEFAULT_SEVERITY, help="1..5; the maximum in 'gradual'")
    add(d, "--n-test", type=int, default=None, help="digits: test images per domain (default 512)")
    add(d, "--max-per-domain", type=int, default=None,
        help="imagenet-c / cifar: images per domain (the same ones in each; NUM_EX, RobustBench's n_examples); "
             "default: all of the subset")
    add(d, "--subset", choices=SUBSETS, default=None,
        help="imagenet-c: " + "; ".join(f"{k}: {v}" for k, v in SUBSET_HELP.items()) + " (default 5000)")
    add(d, "--preprocess", choices=PREPROCESS, default=None,
        help="imagenet-c: the input pipeline, " + "; ".join(f"{k}: {v}" for k, v in PREPROCESS_HELP.items())
             + f" (default {DEFAULT_PREPROCESS['imagenet-c']}, the IMSE paper's)")
    add(d, "--label-map", metavar="FILE",
        help="imagenet-c: class folder -> model output, as JSON {folder: index} or one folder per line (line k: "
             "class k); needed when folders are not ImageNet WordNet ids")
    add(d, "--image-check", choices=SCAN_MODES, default=None,
        help="imagenet-c: how every chosen image file is checked before the run. header (default): format, empty "
             "and text files, truncated JPEG/PNG; decode: a full decode of every file (slower, finds damage inside)")
    add(d, "--skip-unreadable", action="store_true",
        help="imagenet-c: leave unreadable image files out of every domain (counted and recorded) instead of "
             "stopping with an error")
    add(d, "--report", choices=REPORTS, default=None,
        help="what the per-domain table shows: error (the corruption benchmarks' papers; default for imagenet-c "
             "and cifar) or accuracy (default for digits); both means are always listed")
    add(d, "--workers", type=int, default=0, help="imagenet-c: threads decoding images")
    m = p.add_argument_group("model")
    add(m, "--model", help="timm model name (with --checkpoint), or hf-hub:<org>/<name> from the local Hugging Face "
                           "cache; default: the embedded digits ViT")
    add(m, "--checkpoint", help="local weights for --model: safetensors, .pth/.pt/.bin/.ckpt (loaded without "
                                "executing pickled code), a model directory, or timm's .npz; nothing is downloaded")
    add(m, "--num-classes", type=int, default=None, help="classes of --checkpoint's head (default: timm's)")
    add(m, "--img-size", type=int, default=None,
        help="build the timm model at this input size (e.g. 32 for a CIFAR ViT; default: timm's)")
    add(m, "--patch-size", type=int, default=None, help="build the timm ViT with this patch size (default: timm's)")
    add(m, "--train-steps", type=int, default=None, help="digits: training steps of the embedded ViT")
    add(m, "--cache-dir", help="where the embedded model is cached (default $IMSE_KERNELS_CACHE or "
                               "~/.cache/imse_kernels)")
    r = p.add_argument_group("run")
    settings_help = "; ".join(f"{k}: {v}" for k, v in SETTING_HELP.items())
    add(r, "--setting", choices=SETTINGS + ("multi_stream",), default="continual",
        help=f"{settings_help}; multi_stream: --streams K streams, each its own order of the domains, in "
             "mixed batches (MultiStreamIMSE against K separate IMSE adapters, both with the imse config)")
    add(r, "--dirichlet", type=float, default=DEFAULT_DIRICHLET,
        help=f"{' and '.join(DIRICHLET_SETTINGS)}: concentration gamma of the Dirichlet label sampling "
             "(smaller: longer single-class runs)")
    add(r, "--streams", type=int, default=4, help="multi_stream: number of streams K")
    add(r, "--method", type=method_list, default="all",
        help=f"comma-separated, side by side on the same stream: {', '.join(METHODS)} (or all: "
             "source,tent,sar,eata,cotta,deyo,imse)")
    add(r, "--rounds", type=int, default=3, help="recurring: passes over the corruptions")
    add(r, "--batch-size", type=int, default=64,
        help="images per batch; each method's learning rate scales with it as its authors' code does "
             "(its lr_scaling; the configs' lr is the value at batch 64)")
    add(r, "--seed", type=int, default=0, help="corruption noise, image order and adapters")
    add(r, "--seeds", type=seed_list, default=None,
        help="comma-separated seeds, e.g. 0,1,2: the whole comparison once per seed, reported as "
             "mean ± std and min-max of each method's mean accuracy (replaces --seed)")
    add(r, "--amp", choices=("bf16", "fp16"), default=None, help="autocast dtype (default: float32)")
    add(r, "--backend", default=None, help="spectral backend: auto, torch, cpu, triton, cuda")
    add(r, "--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    add(r, "--threads", type=int, default=None, help="torch CPU threads")
    add(r, "--tent-lr", type=float, default=None, help="the same as --set tent.lr=...")
    add(r, "--tent-optimizer", choices=("adam", "sgd"), default=None, help="the same as --set tent.optim=...")
    add(r, "--imse-lr", type=float, default=None,
        help="the same as --set imse.lr=... for imse, imse-mix and imse-nodiv (default 7e-3; 3e-3 in the "
             "recurring setting, as the official configs)")
    add(r, "--compile", action="store_true",
        help="torch.compile each method's forward (Tent, the IMSE variants and MultiStreamIMSE: forward + loss; "
             "the first batch compiles)")
    add(r, "--dist-timeout", type=float, default=120.0,
        help="under torchrun: seconds before a rank that died, stalled or never joined is an error")
    add(r, "--omp-wait-policy", choices=OMP_WAIT_POLICIES, default="auto",
        help="OpenMP's wait policy, which OpenMP reads only when it starts, so imse-eval restarts itself once to "
             "set it. auto: PASSIVE for a CPU run when OMP_WAIT_POLICY is unset (spinning threads collapse when "
             "another process shares the cores: an IMSE step measured 0.38 s passive against 9.7 s spinning on 2 "
             "shared cores), else the environment's; passive / active: that policy; inherit: never restart. "
             "Only the command line restarts; main(argv) keeps the process's OpenMP")
    o = p.add_argument_group("output")
    add(o, "--output-dir", default="imse_eval_out", help="results.json, results.csv, accuracy.png go here")
    add(o, "--no-progress", action="store_true", help="no progress bars")
    add(o, "--no-plot", action="store_true")
    return p


#: option dest -> the run field it sets (the same name where absent).
_RUN_OPTIONS = ("data", "data_dir", "source_dir", "corruptions", "severity", "n_test", "max_per_domain", "subset",
                "preprocess", "label_map", "image_check", "skip_unreadable", "report", "model", "checkpoint",
                "num_classes", "img_size", "patch_size", "train_steps", "setting", "dirichlet", "rounds", "streams",
                "batch_size", "amp", "backend", "device", "threads", "compile")


def option_layer(given: argparse.Namespace) -> dict[str, dict]:
    """The options given on the command line as config sections (they replace the config file's values)."""
    given = vars(given)
    out: dict[str, dict] = {}
    run = out.setdefault(RUN, {})
    for dest in _RUN_OPTIONS:
        if dest in given:
            run[dest] = given[dest]
    if "method" in given:
        run["methods"] = given["method"]
    if "seed" in given:
        run["seeds"] = [given["seed"]]
    if given.get("seeds") is not None:
        run["seeds"] = given["seeds"]
    if given.get("tent_lr") is not None:
        out.setdefault("tent", {})["lr"] = given["tent_lr"]
    if given.get("tent_optimizer") is not None:
        out.setdefault("tent", {})["optim"] = given["tent_optimizer"]
    if given.get("imse_lr") is not None:
        for name, e in registry.REGISTRY.items():
            if e.cls is IMSE:
                out.setdefault(name, {})["lr"] = given["imse_lr"]
    return out


def check(argv: Sequence[str]) -> Plan:
    """The check stage: parse `argv`, read the config file, apply the options and overrides (`eval.run_config`)
    and check the data spec; `UsageError` / `ConfigError` for anything that cannot run."""
    args = build_parser().parse_intermixed_args(argv)
    given = build_parser(defaults=False).parse_intermixed_args(argv)
    layers = [load_config_file(args.config)] if args.config else []
    layers += [option_layer(given), layer(parse_assignment(a) for a in args.set), layer(parse_pairs(args.overrides))]
    config = resolve(layers)
    invocation = Invocation(args.output_dir, not args.no_progress, not args.no_plot, args.cache_dir, args.workers,
                            args.dist_timeout, tuple(argv))
    spec = spec_from_run(config.run, invocation.cache_dir, invocation.workers)
    spec.check()
    return Plan(config, spec, invocation)


def run_seeds(plan: Plan, session: Session, writer: Optional[ResultsWriter] = None) -> tuple[list, int]:
    """The run stage of the single-stream settings: every method on each seed's stream. Returns the runs and
    the images per domain. `writer` writes the results files as each method finishes; a `DataError` met after
    that says where the finished methods' results are."""
    run, data = plan.run, session.data
    comm = session.comm
    backend = use_backend(run.backend) if run.backend else contextlib.nullcontext()
    runs, images = [], data.domain_size
    try:
        with backend:
            for seed in run.seeds:
                domains = data.domains(seed)
                size = images_per_domain(domains)
                images = images or size
                opts = MethodOptions(plan.config.methods, run.batch_size, seed, run.compile,
                                     None if comm is None else comm.group)
                tag = f" (seed {seed})" if len(run.seeds) > 1 else ""
                done = None if writer is None else (
                    lambda part, runs=runs, images=images: writer.partial(runs + [part], images))
                runs.append(run_seed(run, opts, domains, size, data.model, data.source, session.device, seed, comm,
                                     session.log, plan.invocation.progress, tag, on_result=done))
                del domains
    except DataError as err:
        if writer is None or not writer.methods_written:
            raise
        where = writer.out / "results.json"
        raise DataError(err.path, err.problem, f"{err.fix + '; ' if err.fix else ''}the finished methods' results "
                        f"({', '.join(writer.methods_written)}) are in {where}") from None
    return runs, images


def evaluate(plan: Plan) -> dict:
    """Set up, run and report what `plan` describes; returns the results payload (also written to its output
    directory, after each method and at the end)."""
    t_start = time.perf_counter()
    with progress.bars(plan.invocation.progress):
        session = set_up(plan)
        with progress.bars(plan.invocation.progress and session.reports):
            if plan.run.setting == "multi_stream":
                return evaluate_multi_stream(plan, session, t_start)
            writer = ResultsWriter(plan, session, t_start)
            runs, images = run_seeds(plan, session, writer)
            return writer.final(runs, images)


def restart_for_openmp(choice: str) -> None:
    """Restart this command once with the OpenMP wait policy `choice` asks for (see --omp-wait-policy)."""
    current = os.environ.get("OMP_WAIT_POLICY")
    if choice == "inherit" or (choice == "auto" and (current is not None or torch.cuda.is_available())):
        return
    want = "ACTIVE" if choice == "active" else "PASSIVE"
    if current is not None and current.upper() == want:
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "imse_kernels.eval", *sys.argv[1:]],
              dict(os.environ, OMP_WAIT_POLICY=want))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the exit status (2 for a usage or data error: a bad option, key, value, file
    or folder).

    `argv` None means the command line (which may restart once for --omp-wait-policy)."""
    raw = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv is None:
            restart_for_openmp(build_parser().parse_intermixed_args(raw).omp_wait_policy)
        evaluate(check(raw))
    except (UsageError, ConfigError, DataError, SlowAutocastError) as exc:
        print(f"imse-eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
