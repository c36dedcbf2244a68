#!/usr/bin/env python
"""Singular-value fine-tuning (SVF) of a Llama-style decoder: this library against Transformer²'s formulation.

    python benchmarks/svf_bench.py            # the two decoders below, fp32 and bf16, CPU (several minutes)
    python benchmarks/svf_bench.py --quick    # a tiny decoder, seconds (checks the script, not numbers)

Decoders (random init, no download): `small` 4 layers, hidden 512, MLP 1408, 8 heads / 2 KV heads (GQA),
vocabulary 4096; `large` 8 layers, hidden 1024, MLP 2816, 16 / 4 heads. Batch 4 × 256 tokens, causal-LM
loss on the inputs. The MLP matrices (gate, up, down) are adapted, as in Transformer².

Training step (forward, backward, clip_grad_norm_ 1e-3 and Adam lr 2e-3 on the z vectors, as its Reinforce):
  svf  this library: `svf.to_svf`, s = S ⊙ sigmoid(z) · ΣS/Σ(S ⊙ sigmoid(z)) per step, through spectral_linear
  t2   Transformer²'s formulation, reproduced from its code (utils.forward / backward, compose_new_params,
       Policy.get_mask): recompose U·diag_embed(S ⊙ m)·Vᵀ·(ΣS/Σ(S ⊙ m)) under no_grad and copy it into the
       weight; dense forward/backward with the MLP weights trainable (dense dW); recompose again with a graph
       and backpropagate dW into z. Only the MLP weights require grad here (its own script leaves every
       parameter of the checkpoint trainable, which would only make it slower).
  Reported: time (median of paired ratios t2/svf), peak bytes saved for backward (saved_tensors_hooks;
  parameters, buffers and the decomposition not counted), RSS high-water delta (indicative), and the bytes of
  state kept per adapted matrix (svf: U, S, Vh, z; t2: W, dW, U, S, V, z).
Inference, K = 4 experts mixed per sample (α: B × K, softmax of random logits), no grad:
  mixed         svf.mix_experts: codes C = α·Z, one per sample, through the per-sample-codes path
  single        one expert (frozen z: s cached, the op's cached W', one GEMM per layer)
  single_coded  one expert through the same per-sample path (mix_experts with K = 1)
  loop          Transformer²'s serving: per distinct mixture (here per sample) recompose the mixed weights
                (WeightedCombination: α·Z, no sigmoid after mixing, rescale) into the dense model, run its rows
Gradient check: z gradients of svf against t2 in the run dtype (relative max error).
SVD: seconds of one float32 `svf.svd_factors` (torch.linalg.svd, LAPACK gesdd) per --svd-shapes matrix, once;
  the decomposition file makes this a once-per-checkpoint cost.
Writes benchmarks/results/svf_<machine>[_quick].{json,txt}.
"""
import argparse
import copy
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import bench_common as BC
import torch
from bench_common import SavedTensorTracker, device_peak_bytes, load1, measure_interleaved, paired_ratio

from imse_kernels import svf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DECODERS = {
    "small": dict(num_hidden_layers=4, hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4096),
    "large": dict(num_hidden_layers=8, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=4096),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=176, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
MLP = ("*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj")
LR, MAX_GRAD_NORM, INIT_VAL = 2e-3, 1e-3, 0.1  # Transformer²'s cfgs (config.yaml, reinforce.yaml)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def decoder(name: str, seq: int, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**DECODERS[name], max_position_embeddings=max(seq, 256), tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()  # eval: no dropout; the step is a training step all the same


# --------------------------------------------------------------------------------------------
# Transformer²'s formulation (reproduced from SakanaAI/self-adaptive-llms; no code copied)

class Transformer2SVF:
    """Its Policy (z per MLP weight, mask sigmoid(z) cast to the run dtype, max_mult 1), compose_new_params,
    and the step of its Reinforce: forward() copies the recomposed weights in, the model's backward gives
    dense dW, backward() recomposes with a graph and pushes dW into z."""

    def __init__(self, model, dtype: torch.dtype, z_init: dict) -> None:
        self.model, self.dtype = model, dtype
        model.requires_grad_(False)
        mlp = ("gate_proj", "up_proj", "down_proj")
        self.keys = [n + ".weight" for n, _ in model.named_modules() if n.endswith(mlp)]
        self.dec, self.z = {}, {}
        for k in self.keys:
            w = model.get_parameter(k)
            w.requires_grad_(True)
            U, S, Vh = torch.linalg.svd(w.detach().float(), full_matrices=False)  # it: torch.svd in fp32, then cast
            self.dec[k] = (U.to(dtype), S.to(dtype), Vh.t().to(dtype))
            self.z[k] = torch.nn.Parameter(z_init[k[: -len(".weight")]].to(dtype).clone())
        self.params = list(self.z.values())
        self.opt = torch.optim.Adam(self.params, lr=LR)

    def mask(self, z):
        return torch.sigmoid(z).to(self.dtype)

    def compose(self, k, m=None):
        U, S, V = self.dec[k]
        m = self.mask(self.z[k]) if m is None else m
        return (U @ torch.diag_embed(S * m) @ V.T) * (S.sum() / (S * m).sum())

    def backward(self, ids):
        """One forward/backward; leaves dz in the z parameters."""
        with torch.no_grad():
            for k in self.keys:
                self.model.get_parameter(k).copy_(self.compose(k))
        self.model(ids, labels=ids).loss.backward()
        for i, k in enumerate(self.keys):
            self.compose(k).backward(self.model.get_parameter(k).grad, retain_graph=i < len(self.keys) - 1)

    def step(self, ids):
        self.backward(ids)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.opt.step()
        self.opt.zero_grad()
        self.model.zero_grad()

    def state(self) -> list:
        """What it keeps per adapted matrix: the weight, its dense gradient, U, S, V, z."""
        out = []
        for k in self.keys:
            w = self.model.get_parameter(k)
            dW = torch.empty_like(w)  # allocated by every backward (zero_grad frees it between steps)
            out.append(sum(t.numel() * t.element_size() for t in (w, dW, *self.dec[k], self.z[k])))
        return out

    def persistent(self) -> list:
        return list(self.model.parameters()) + list(self.model.buffers()) + [t for d in self.dec.values() for t in d]

    @torch.no_grad()
    def load_mixture(self, alpha_row, experts):
        """WeightedCombination + forward(): the raw expert vectors combined by α, no mask, then composed."""
        for k in self.keys:
            m = (alpha_row.to(self.dtype) @ experts[k[: -len(".weight")]].to(self.dtype))
            self.model.get_parameter(k).copy_(self.compose(k, m))


class LibrarySVF:
    """The same step through this library."""

    def __init__(self, model) -> None:
        self.model = model
        self.names = svf.to_svf(model, preset="llama", parts=("mlp",), z_init=INIT_VAL)
        self.layers = svf.svf_layers(model)
        self.params = [m.z for m in self.layers.values()]
        self.opt = torch.optim.Adam(self.params, lr=LR)

    def backward(self, ids):
        self.model(ids, labels=ids).loss.backward()

    def step(self, ids):
        self.backward(ids)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.opt.step()
        self.opt.zero_grad()

    def state(self) -> list:
        return [sum(t.numel() * t.element_size() for t in (m.U, m.S, m.Vh, m.z)) for m in self.layers.values()]

    def persistent(self) -> list:
        return list(self.model.parameters()) + list(self.model.buffers())


# --------------------------------------------------------------------------------------------

def saved_peak(fn, persistent) -> int:
    tracker = SavedTensorTracker(exclude=persistent)
    with tracker.track():
        fn()
    gc.collect()
    return tracker.peak


def train_case(name: str, dtype_name: str, args, log=print) -> dict:
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, DECODERS[name]["vocab_size"], (args.batch, args.seq), generator=g)
    base = decoder(name, args.seq, dtype)
    t0 = time.perf_counter()
    lib = LibrarySVF(copy.deepcopy(base))
    svd_s = time.perf_counter() - t0
    z0 = {n: m.z.detach().clone() for n, m in lib.layers.items()}
    t2 = Transformer2SVF(base, dtype, z0)
    # gradient agreement on the same z, before any step
    lib.backward(ids)
    t2.backward(ids)
    num = max((m.z.grad.float() - t2.z[n + ".weight"].grad.float()).abs().max().item() for n, m in lib.layers.items())
    den = max(m.z.grad.float().abs().max().item() for m in lib.layers.values())
    lib.opt.zero_grad()
    t2.opt.zero_grad()
    t2.model.zero_grad()
    fns = {"svf": lambda: lib.step(ids), "t2": lambda: t2.step(ids)}
    t = measure_interleaved(fns, "cpu", args.rounds, args.min_block_s, args.warmup, min_rounds=args.min_rounds,
                            max_case_s=args.max_case_s, log=log)
    row = {"decoder": name, "dtype": dtype_name, "tokens": args.batch * args.seq, "adapted_matrices": len(lib.names),
           "svd_seconds_all_matrices": svd_s,
           "svf_ms": t["svf"].median() * 1e3, "t2_ms": t["t2"].median() * 1e3,
           "t2_over_svf": paired_ratio(t["t2"], t["svf"]), "t2_over_svf_min": BC.min_ratio(t["t2"], t["svf"]),
           "rounds": len(t["svf"].times), "z_grad_rel_err": num / den if den else math.nan}
    if not args.no_memory:
        row["svf_saved_mb"] = saved_peak(lambda: lib.step(ids), lib.persistent) / 2**20
        row["t2_saved_mb"] = saved_peak(lambda: t2.step(ids), t2.persistent) / 2**20
        row["svf_rss_peak_mb"] = (device_peak_bytes(lambda: lib.step(ids), "cpu")[0] or math.nan) / 2**20
        row["t2_rss_peak_mb"] = (device_peak_bytes(lambda: t2.step(ids), "cpu")[0] or math.nan) / 2**20
    ls, ts = lib.state(), t2.state()
    row.update(svf_state_mb=sum(ls) / 2**20, t2_state_mb=sum(ts) / 2**20,
               state_ratio=sum(ls) / sum(ts), state_ratio_max_per_matrix=max(a / b for a, b in zip(ls, ts)),
               load1=load1())
    return row


def infer_case(name: str, dtype_name: str, args, k: int = 4, log=print) -> dict:
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, DECODERS[name]["vocab_size"], (args.batch, args.seq), generator=g)
    base = decoder(name, args.seq, dtype)
    lib = LibrarySVF(copy.deepcopy(base))
    experts = [{n: INIT_VAL + 0.5 * torch.randn(m.rank, generator=g) for n, m in lib.layers.items()} for _ in range(k)]
    svf.set_experts(lib.model, experts)
    alpha = torch.softmax(torch.randn(args.batch, k, generator=g), -1)
    svf.load_z_state(lib.model, experts[0])
    single_model = copy.deepcopy(lib.model)
    single_coded = copy.deepcopy(lib.model)
    svf.set_experts(single_coded, [experts[0]])
    ones = torch.ones(args.batch, 1)
    t2 = Transformer2SVF(base, dtype, experts[0])
    stacked = {n: torch.stack([e[n] for e in experts]) for n in lib.layers}

    def mixed():
        with torch.no_grad(), svf.mix_experts(lib.model, alpha, mask="identity"):
            return lib.model(ids).logits

    def single():
        with torch.no_grad():
            return single_model(ids).logits

    def coded():
        with torch.no_grad(), svf.mix_experts(single_coded, ones, mask="identity"):
            return single_coded(ids).logits

    def loop():
        outs = []
        with torch.no_grad():
            for b in range(args.batch):
                t2.load_mixture(alpha[b], stacked)
                outs.append(t2.model(ids[b:b + 1]).logits)
        return torch.cat(outs)

    agree = (mixed().float() - loop().float()).abs().max().item() / loop().float().abs().max().item()
    fns = {"mixed": mixed, "single": single, "single_coded": coded, "loop": loop}
    t = measure_interleaved(fns, "cpu", args.rounds, args.min_block_s, args.warmup, min_rounds=args.min_rounds,
                            max_case_s=args.max_case_s, log=log)
    return {"decoder": name, "dtype": dtype_name, "experts": k, "tokens": args.batch * args.seq,
            **{f"{p}_ms": t[p].median() * 1e3 for p in fns},
            "mixed_over_single": paired_ratio(t["mixed"], t["single"]),
            "mixed_over_single_coded": paired_ratio(t["mixed"], t["single_coded"]),
            "loop_over_mixed": paired_ratio(t["loop"], t["mixed"]),
            "mixed_vs_loop_logits_rel_err": agree, "rounds": len(t["mixed"].times), "load1": load1()}


def svd_case(shape: tuple) -> dict:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) / math.sqrt(shape[1])
    start = time.perf_counter()
    U, S, Vh = svf.svd_factors(w, torch.float32)
    seconds = time.perf_counter() - start
    err = ((U * S) @ Vh - w).abs().max().item() / w.abs().max().item()
    return {"shape": list(shape), "dtype": "fp32", "seconds": seconds, "reconstruction_rel_err": err, "load1": load1()}


def text(train_rows, infer_rows, args, svd_rows=()) -> list:
    lines = ["SVF training step (forward + backward + clip + Adam on z), batch "
             f"{args.batch} x {args.seq} tokens; t2/svf = Transformer²'s time over this library's (paired median)",
             "decoder dtype  svf ms   t2 ms  t2/svf (min-rounds)  saved MB svf/t2   RSS peak MB svf/t2  "
             "state MB svf/t2 (ratio)  z-grad rel err"]
    for r in train_rows:
        saved = f"{r.get('svf_saved_mb', math.nan):>6.1f}/{r.get('t2_saved_mb', math.nan):<6.1f}"
        lines.append(f"{r['decoder']:<7} {r['dtype']:<5} {r['svf_ms']:>7.1f} {r['t2_ms']:>7.1f} "
                     f"{r['t2_over_svf']:>6.2f} ({r['t2_over_svf_min']:.2f})       {saved}"
                     f"    {r.get('svf_rss_peak_mb', math.nan):>6.0f}/{r.get('t2_rss_peak_mb', math.nan):<6.0f}"
                     f"       {r['svf_state_mb']:>6.1f}/{r['t2_state_mb']:<6.1f} ({r['state_ratio']:.3f})"
                     f"    {r['z_grad_rel_err']:.1e}")
    lines += ["", "Inference, K experts mixed per sample (no grad); ratios are paired medians",
              "decoder dtype  K  mixed ms  single ms  single_coded ms  loop ms  mixed/single  mixed/single_coded  "
              "loop/mixed  logits mixed-vs-loop"]
    for r in infer_rows:
        lines.append(f"{r['decoder']:<7} {r['dtype']:<5} {r['experts']:>2} {r['mixed_ms']:>9.1f} "
                     f"{r['single_ms']:>10.1f} {r['single_coded_ms']:>16.1f} {r['loop_ms']:>8.1f} "
                     f"{r['mixed_over_single']:>13.2f} {r['mixed_over_single_coded']:>19.2f} "
                     f"{r['loop_over_mixed']:>11.2f}  {r['mixed_vs_loop_logits_rel_err']:.1e}")
    if svd_rows:
        lines += ["", "SVD (float32, once per checkpoint): " + "; ".join(
            f"{r['shape'][0]}x{r['shape'][1]} {r['seconds']:.1f} s (reconstruction {r['reconstruction_rel_err']:.0e})"
            for r in svd_rows)]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    BC.add_common_args(ap)
    ap.add_argument("--decoders", default=None, help="small,large (default; --quick: tiny)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="tokens per sample (default 256; --quick 32)")
    ap.add_argument("--parts", default="train,infer,svd")
    ap.add_argument("--svd-shapes", default=None, help="default 4096x4096,2048x5632 (--quick: 256x512)")
    args = ap.parse_args(argv)
    if args.device != "cpu":
        ap.error("svf_bench runs on the CPU only")
    BC.resolve_common(args, ap)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.seq = args.seq or (32 if args.quick else 256)
    decoders = BC.csv_list(args.decoders or ("tiny" if args.quick else "small,large"))
    dtypes, parts = BC.csv_list(args.dtypes), BC.csv_list(args.parts)
    env = BC.env_info("cpu")
    print(BC.install_banner(env["install"]), flush=True)
    train_rows, infer_rows, svd_rows, t0 = [], [], [], time.perf_counter()
    for name in decoders:
        for dt in dtypes:
            if "train" in parts:
                train_rows.append(train_case(name, dt, args))
                print("  " + text(train_rows[-1:], [], args)[2], flush=True)
            if "infer" in parts and name != "large":
                infer_rows.append(infer_case(name, dt, args))
                print("  " + text([], infer_rows[-1:], args)[-1], flush=True)
    if "svd" in parts:
        for shape in BC.csv_list(args.svd_shapes or ("256x512" if args.quick else "4096x4096,2048x5632")):
            svd_rows.append(svd_case(tuple(int(v) for v in shape.split("x"))))
            print(f"  svd {shape}: {svd_rows[-1]['seconds']:.1f} s", flush=True)
    lines = text(train_rows, infer_rows, args, svd_rows)
    lines.insert(0, f"svf_bench on {BC.machine_tag('cpu')}, torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY "
                    f"{env['omp_wait_policy']}; decoders {', '.join(f'{d}={DECODERS[d]}' for d in decoders)}; "
                    f"total {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f} at end")
    out_text = "\n".join(lines)
    print("\n" + out_text)
    if not args.no_save:
        out = Path(args.out_dir) if args.out_dir else BC.RESULTS_DIR
        out.mkdir(parents=True, exist_ok=True)
        stem = f"svf_{args.tag or BC.machine_tag('cpu')}" + ("_quick" if args.quick else "")
        (out / f"{stem}.json").write_text(json.dumps({"env": env, "args": vars(args), "train": train_rows,
                                                      "infer": infer_rows, "svd": svd_rows}, indent=1, default=str))
        (out / f"{stem}.txt").write_text(BC.install_banner(env["install"]) + "\n" + out_text + "\n")
        print(f"wrote {out / stem}.json, .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
