"""Benchmark: the rank advisor's streaming pass against a plain lazy torch loop doing the same SVDs.

    python bench/advise.py                        # four Llama-shaped bf16 pairs of growing size, CPU
    python bench/advise.py --sizes 256x4 --json out.json
    python bench/advise.py --project-only         # time the Llama-2-7B matrix shapes and project a 7B pair
    python bench/advise.py --sizes 4096x1 --contenders partial --no-project   # a 7B-shaped layer, projected
    python bench/advise.py --matrix 32000x4096 --contenders partial --no-project   # one matrix: peak memory

Each pair (base, tuned = base + a rank-8 change in every matrix) is generated here in Hugging Face's layout
(``config.json``, ``model-0000k-of-0000n.safetensors`` shards and their index), measured and deleted. Each
contender (``--contenders``, default all three) runs in a fresh process that reports its wall time and its
peak resident memory (``VmHWM``, :func:`peak_rss_mib`):

* ``advisor``: :func:`verification.rank_report.advise_stream` with ``spectrum="full"``, what
  ``python -m verification.advise --spectrum full`` runs before it prints (layout from ``config.json``,
  tensors read lazily in blocks of rows from the shards the index names, ``ΔW`` in float32, all its
  singular values, the statistics of its rounding bound and the noise floor, norms, bias and vector
  changes, one layer at a time); ``setup`` is the part before the first layer (importing ``transformers``
  and building the model on the meta device to read the layout);
* ``partial``: the same pass with ``spectrum="partial"`` (``--spectrum partial``): a certified partial
  spectrum per layer (:func:`lora_theory.partial_spectrum.partial_spectrum_from_blocks`) instead of
  ``svdvals``; ``ranks_ok`` says whether every layer came out settled at the planted rank;
* ``loop``: for every 2-D tensor, ``safe_open(...).get_tensor`` of both, ``.float()``, their difference,
  ``torch.linalg.svdvals``: the least a tool computing the same spectra must do.

``--matrix ROWSxCOLS`` measures a pair holding one bf16 matrix of that shape instead (a planted rank-8
change, the shard layout and index without ``config.json``, so read as an ``nn.Linear``): the peak memory
of the pass over a model's largest tensor (Llama-2-7B: the 32,000 x 4096 embeddings) without the
``transformers`` import and the meta-device model.

The advisor's children also time each layer (from one layer's result to the next). For a pair of
Llama-2-7B shapes (``4096xL``: hidden 4096, intermediate 11,008, vocabulary 32,000) the run is projected
to 32 layers: setup, embeddings, head and vectors as measured, plus ``32 / L`` times the measured decoder
layers (``projection_7b`` in the row).

The 7B projection times ``torch.linalg.svdvals`` of one float32 matrix of each Llama-2-7B shape
(4096 x 4096 attention, 11008 x 4096 MLP; 32,000 x 4096 embeddings scaled from the MLP time by
``m·n²``) and adds them up by layer count (32 layers, untied head). Threads: ``--threads`` (default 1:
on a shared two-core machine two OpenMP threads ran a 1024 x 1024 ``svdvals`` in 30 s against 0.65 s with
one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA2_7B = {"hidden": 4096, "inter": 11008, "layers": 32, "vocab": 32000}
CONTENDERS = ("loop", "advisor", "partial")
PLANTED_RANK = 8  # the rank of the change planted in every matrix


def parse_size(text):
    """``HIDDENxLAYERS`` (intermediate = 2.6875·hidden rounded to 8, vocabulary 32,000 from 1024 on)."""
    hidden, layers = (int(v) for v in text.lower().split("x"))
    inter = int(round(hidden * 2.6875 / 8)) * 8
    vocab = 32000 if hidden >= 1024 else 8000 * max(1, hidden // 256)
    return {"hidden": hidden, "layers": layers, "inter": inter, "vocab": vocab}


def tensor_shapes(size):
    """Llama tensor names and shapes in model order (MHA: as many key/value heads as query heads)."""
    h, f = size["hidden"], size["inter"]
    out = [("model.embed_tokens.weight", (size["vocab"], h))]
    for i in range(size["layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (h, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (size["vocab"], h))]
    return out


def parameters(size) -> int:
    n = 0
    for _, shape in tensor_shapes(size):
        k = 1
        for d in shape:
            k *= d
        n += k
    return n


def parse_matrix(text):
    """``ROWSxCOLS`` of a one-matrix pair (``--matrix``)."""
    rows, cols = (int(v) for v in text.lower().split("x"))
    if rows < 1 or cols < 1:
        raise ValueError(f"a matrix needs positive rows and columns, got {text!r}")
    return rows, cols


def write_matrix_pair(folder: Path, shape, *, rank=PLANTED_RANK, seed=0, key="proj.weight"):
    """Write ``folder/base`` and ``folder/tuned``: one bfloat16 ``shape`` matrix each (tuned = base + a rank
    ``rank`` change of 5% of its norm, as :func:`write_pair`), as one shard with its index, no ``config.json``."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(shape, generator=g)  # (rows, cols)
    dw = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
    dw *= 0.05 * float(w.norm()) / float(dw.norm())
    fname = "model-00001-of-00001.safetensors"
    index = {"metadata": {"total_size": 2 * shape[0] * shape[1]}, "weight_map": {key: fname}}
    for tag, t in (("base", w), ("tuned", w + dw)):
        (folder / tag).mkdir(parents=True)
        save_file({key: t.to(torch.bfloat16)}, str(folder / tag / fname), metadata={"format": "pt"})
        (folder / tag / "model.safetensors.index.json").write_text(json.dumps(index))
    del w, dw


def write_pair(folder: Path, size, *, rank=PLANTED_RANK, shard_bytes=1 << 29, seed=0):
    """Write ``folder/base`` and ``folder/tuned`` (bfloat16 shards, index, config.json), one tensor in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=size["hidden"],
        intermediate_size=size["inter"],
        num_hidden_layers=size["layers"],
        num_attention_heads=max(1, size["hidden"] // 128),
        num_key_value_heads=max(1, size["hidden"] // 128),
        vocab_size=size["vocab"],
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )
    shapes = tensor_shapes(size)
    groups, cur, cur_bytes = [], [], 0
    for name, shape in shapes:
        nbytes = 2
        for d in shape:
            nbytes *= d
        if cur and cur_bytes + nbytes > shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nbytes
    groups.append(cur)
    g = torch.Generator().manual_seed(seed)
    for tag in ("base", "tuned"):
        (folder / tag).mkdir(parents=True)
        cfg.save_pretrained(folder / tag)
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        base, tuned = {}, {}
        for name, shape in group:
            if len(shape) == 1:
                w = 1 + 0.01 * torch.randn(shape, generator=g)
                dw = torch.zeros(shape)
            else:
                w = 0.02 * torch.randn(shape, generator=g)
                dw = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
                dw *= 0.05 * float(w.norm()) / float(dw.norm())
            base[name] = w.to(torch.bfloat16)
            tuned[name] = (w + dw).to(torch.bfloat16)
            weight_map[name] = fname
            del w, dw
        save_file(base, str(folder / "base" / fname), metadata={"format": "pt"})
        save_file(tuned, str(folder / "tuned" / fname), metadata={"format": "pt"})
        del base, tuned
    index = {"metadata": {"total_size": 2 * parameters(size)}, "weight_map": weight_map}
    for tag in ("base", "tuned"):
        (folder / tag / "model.safetensors.index.json").write_text(json.dumps(index))


# ------------------------------------------------------------------------------------------ contenders


def _timed_stream(stamps):
    """Wrap :func:`verification.streaming.stream_spectra` so that each layer's finishing time is recorded."""
    import verification.streaming as streaming

    original = streaming.stream_spectra

    def timed(*args, **kwargs):
        for item in original(*args, **kwargs):
            stamps.append((getattr(item, "spec", None) and getattr(item.spec, "name", None), time.perf_counter()))
            yield item

    streaming.stream_spectra = timed


def child_advisor(base, tuned, device, spectrum="full"):
    from verification.rank_report import advise_stream
    from verification.streaming import open_pair

    open_pair(base, tuned)  # imports transformers, builds the model on the meta device
    setup = time.perf_counter()
    stamps = []
    _timed_stream(stamps)
    report = advise_stream(base, tuned, device=device, progress=False, spectrum=spectrum)
    layers, last = [], setup
    for (name, t), a in zip(stamps, report.layers):
        layers.append({"name": name, "shape": list(a.shape), "seconds": t - last})
        last = t
    extra = {
        "layers": layers,
        "tail_s": time.perf_counter() - last,  # vectors and the report after the last matrix
        "ranks_ok": all(a.settled and a.rank_above_floor == PLANTED_RANK for a in report.layers),
        "unsettled": sum(not a.settled for a in report.layers),
    }
    return len(report.layers), setup, extra


def child_partial(base, tuned, device):
    return child_advisor(base, tuned, device, spectrum="partial")


def child_loop(base, tuned, device):
    setup = time.perf_counter()
    import torch
    from safetensors import safe_open

    index = json.loads((Path(base) / "model.safetensors.index.json").read_text())["weight_map"]
    count = 0
    for key, fname in index.items():
        with safe_open(str(Path(base) / fname), "pt") as f0, safe_open(str(Path(tuned) / fname), "pt") as f1:
            if len(f0.get_slice(key).get_shape()) != 2:
                continue
            w0 = f0.get_tensor(key).float().to(device)
            w1 = f1.get_tensor(key).float().to(device)
            torch.linalg.svdvals(w1 - w0).cpu()
            count += 1
    return count, setup, {}


def run_child(kind, base, tuned, device, threads):
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        str(base),
        str(tuned),
        "--device",
        device,
        "--threads",
        str(threads),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: ``VmHWM`` of ``/proc/self/status`` where there is one.

    ``ru_maxrss`` is not used where ``VmHWM`` exists: a child started by ``subprocess`` (``vfork`` then
    ``exec``) inherits the parent's peak in it, so every contender read as the generator's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (macOS: bytes)


def child_main(args):
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    fn = {"advisor": child_advisor, "partial": child_partial, "loop": child_loop}[args.child]
    count, setup, extra = fn(args.paths[0], args.paths[1], args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    seconds, setup = end - start, setup - start
    rss = peak_rss_mib()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "setup_s": setup,
                "spectra_s": seconds - setup,
                "peak_rss_mib": rss,
                "matrices": count,
                **extra,
            }
        )
    )
    return 0


# ------------------------------------------------------------------------------------------ projection


def time_svdvals(shape, device, threads, repeat=1):
    import torch

    torch.set_num_threads(threads)
    x = torch.randn(shape, device=device)
    torch.linalg.svdvals(x[:64, :64])  # warm-up (CUDA handles, MKL)
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.linalg.svdvals(x)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def project_7b(device, threads):
    h, f, L, V = LLAMA2_7B["hidden"], LLAMA2_7B["inter"], LLAMA2_7B["layers"], LLAMA2_7B["vocab"]
    t_attn = time_svdvals((h, h), device, threads)
    t_mlp = time_svdvals((f, h), device, threads)
    t_emb = t_mlp * V / f  # m n^2 with n = 4096 for both
    layer = 4 * t_attn + 3 * t_mlp
    total = L * layer + 2 * t_emb
    return {
        "device": device,
        "threads": threads,
        "svdvals_4096x4096_s": t_attn,
        "svdvals_11008x4096_s": t_mlp,
        "embedding_32000x4096_s_scaled": t_emb,
        "per_layer_s": layer,
        "total_s": total,
        "total_h": total / 3600,
    }


def project_run(run, size):
    """A run on a pair of Llama-2-7B shapes with ``L`` layers, projected to 32: everything outside the decoder
    layers as measured, the decoder layers' measured seconds times ``32 / L``."""
    if (size["hidden"], size["inter"], size["vocab"]) != (LLAMA2_7B["hidden"], LLAMA2_7B["inter"], LLAMA2_7B["vocab"]):
        return None
    if not run.get("layers"):
        return None
    decoder = sum(r["seconds"] for r in run["layers"] if ".layers." in str(r["name"]))
    outside = run["seconds"] - decoder
    total = outside + decoder * LLAMA2_7B["layers"] / size["layers"]
    return {
        "measured_layers": size["layers"],
        "decoder_s": decoder,
        "per_layer_s": decoder / size["layers"],
        "outside_s": outside,
        "total_s": total,
        "total_h": total / 3600,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/advise.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes",
        nargs="*",
        default=None,
        help="HIDDENxLAYERS of the Llama-shaped pairs (default: 256x4 512x8 1024x8 2048x4, none with --matrix)",
    )
    p.add_argument(
        "--matrix",
        nargs="*",
        default=[],
        help="ROWSxCOLS of one-matrix bf16 pairs (no config.json), measured after the --sizes pairs",
    )
    p.add_argument(
        "--contenders",
        default="loop,advisor,partial",
        help="comma-separated: loop, advisor (full spectra), partial (default: all three)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each contender, interleaved (loop, advisor, loop, ...); the fastest is reported",
    )
    p.add_argument("--workdir", default=None, help="where the pairs are written (default: a temporary folder)")
    p.add_argument("--project-only", action="store_true", help="only the 7B projection")
    p.add_argument("--no-project", action="store_true", help="skip the 7B projection")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args)
    results = {"pairs": [], "projection": None}
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown or not contenders:
        p.error(f"--contenders: choose among {', '.join(CONTENDERS)}, got {args.contenders!r}")
    if args.sizes is None:
        args.sizes = [] if args.matrix else ["256x4", "512x8", "1024x8", "2048x4"]
    try:
        pairs = [(text, parse_size(text), None) for text in args.sizes]
        pairs += [(f"m{text}", None, parse_matrix(text)) for text in args.matrix]
    except ValueError as exc:
        p.error(f"--sizes / --matrix: {exc}")
    if not args.project_only:
        print(
            f"{'pair':>11} {'params':>8} {'matrices':>8} {'contender':>9} {'seconds':>8} {'(setup)':>8} "
            f"{'/ loop':>6} {'peak MiB':>8} {'load':>9} {'ranks':>6} {'7B h':>6}",
            flush=True,
        )
        for text, size, shape in pairs:
            work = Path(tempfile.mkdtemp(prefix="bench-advise-", dir=args.workdir))
            try:
                t0 = time.perf_counter()
                if shape is None:
                    write_pair(work, size)
                else:
                    write_matrix_pair(work, shape)
                gen = time.perf_counter() - t0
                base, tuned = work / "base", work / "tuned"
                runs = {kind: [] for kind in contenders}
                for _ in range(args.repeat):
                    for kind in contenders:
                        before = os.getloadavg()[0]
                        run = run_child(kind, base, tuned, args.device, args.threads)
                        run["load_average"] = [before, os.getloadavg()[0]]
                        runs[kind].append(run)
                best = {}
                for kind, done in runs.items():
                    best[kind] = min(done, key=lambda r: r["seconds"])
                    best[kind]["all_seconds"] = [r["seconds"] for r in done]
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if shape is None:
                row = {"size": text, **size, "parameters": parameters(size), "generate_s": gen, **best}
            else:
                row = {"size": text, "matrix": list(shape), "parameters": shape[0] * shape[1], "generate_s": gen}
                row.update(best)
            if "loop" in best and "advisor" in best:
                row["ratio"] = best["advisor"]["seconds"] / best["loop"]["seconds"]
            for kind in contenders:
                run = best[kind]
                proj = project_run(run, size) if size is not None else None
                if proj is not None:
                    run["projection_7b"] = proj
                ratio = f"{run['seconds'] / best['loop']['seconds']:6.2f}" if "loop" in best else f"{'-':>6}"
                ranks = "-" if kind == "loop" else ("ok" if run["ranks_ok"] else f"{run['unsettled']} uns")
                print(
                    f"{text:>11} {row['parameters'] / 1e6:7.0f}M {run['matrices']:>8} {kind:>9} "
                    f"{run['seconds']:8.1f} {run['setup_s']:8.1f} {ratio} {run['peak_rss_mib']:8.0f} "
                    f"{run['load_average'][0]:4.1f}-{run['load_average'][1]:<4.1f} {ranks:>6} "
                    + (f"{proj['total_h']:6.2f}" if proj else f"{'-':>6}"),
                    flush=True,
                )
            results["pairs"].append(row)
            if args.json:  # written after every pair: a long run keeps what it measured
                Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.no_project:
        proj = project_7b(args.device, args.threads)
        results["projection"] = proj
        print(
            f"Llama-2-7B pair on {args.device} ({args.threads} thread(s)): svdvals 4096x4096 "
            f"{proj['svdvals_4096x4096_s']:.2f} s, 11008x4096 {proj['svdvals_11008x4096_s']:.2f} s; "
            f"{proj['per_layer_s']:.0f} s per layer, {proj['total_h']:.2f} h in all (projected)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
