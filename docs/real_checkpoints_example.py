"""The worked example of docs/real_checkpoints.md: a Llama-shaped model built locally, fine-tuned by planted
low-rank changes, stored in float32, bfloat16 and float16, advised and extracted.

    python docs/real_checkpoints_example.py [--workdir DIR] [--budget PARAMS]

Nothing is downloaded: the model is ``LlamaForCausalLM`` from a small config (width 64, 2 layers, grouped
key/value heads, untied head), random weights. The tuned model changes seven matrices by random rank-r
products (r from 1 to 12, relative sizes from 30% down to 0.5% of the matrix) and one norm.
For each storage precision the script prints the advisor's table, then (``--budget``) the allocation of
:func:`lora_theory.allocate_ranks` beside a uniform rank at the same budget, extracts both adapters and
measures the relative error of the logits each gives on 4 x 32 random tokens.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: module -> (rank, relative Frobenius size of the change)
PLANTS = {
    "model.layers.0.self_attn.q_proj": (4, 0.30),
    "model.layers.0.self_attn.k_proj": (2, 0.10),
    "model.layers.0.mlp.up_proj": (12, 0.20),
    "model.layers.1.self_attn.v_proj": (1, 0.05),
    "model.layers.1.self_attn.o_proj": (8, 0.02),
    "model.layers.1.mlp.down_proj": (6, 0.005),
    "lm_head": (3, 0.10),
}


def build(workdir: Path, dtype):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    tuned = transformers.LlamaForCausalLM(cfg).eval()
    tuned.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, (r, size) in PLANTS.items():
            W = tuned.get_submodule(name).weight
            d = torch.randn(W.shape[0], r, generator=g) @ torch.randn(r, W.shape[1], generator=g)
            W += size * d * W.norm() / d.norm()
        tuned.model.layers[0].input_layernorm.weight += 0.05
    tag = str(dtype).replace("torch.", "")
    paths = []
    for name, model in (("base", base), ("tuned", tuned)):
        path = workdir / f"{name}-{tag}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.to(dtype).save_pretrained(path, max_shard_size="200KB")
        paths.append(path)
    return paths


def logits_error(base_path, tuned_path, adapter):
    import transformers

    from verification.peft_export import load_peft_adapter

    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 101, (4, 32), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = transformers.LlamaForCausalLM.from_pretrained(tuned_path, dtype=torch.float32).eval()
        base = transformers.LlamaForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        model = load_peft_adapter(base, adapter).eval()
    with torch.no_grad():
        a, b = model(x).logits, want(x).logits
    return float((a - b).norm() / b.norm())


def main(argv=None) -> int:
    from verification.extract import extract_adapter
    from verification.rank_report import advise_stream, allocation, format_report

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None)
    p.add_argument("--budget", type=int, default=6000)
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="real-ckpt-example-", dir=args.workdir))
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            base, tuned = build(workdir, dtype)
            report = advise_stream(base, tuned, progress=False)
            print(f"\n=== stored in {str(dtype).replace('torch.', '')} ===")
            print(format_report(report).split("\nnote:")[0])
            planted = {n: r for n, (r, _) in PLANTS.items()}
            found = {a.name: a.rank_above_floor for a in report.layers if a.rank_above_floor}
            print(f"planted ranks found: {found == planted} ({found})")
            for a in report.layers:
                if a.name in PLANTS:
                    print(
                        f"  {a.name}: floor {a.floor.spectral:.2e}, detection limit {a.floor.detection_limit:.2e},"
                        f" sigma_r {a.singular_values[PLANTS[a.name][0] - 1]:.2e}"
                    )
            try:
                alloc = allocation(report, budget=args.budget)
            except ImportError:
                print("(lora_theory.allocate_ranks is not available: no allocation)")
                continue
            uni = alloc["uniform"]
            errs = {}
            for label, ranks in (("allocated", alloc["ranks"]), ("uniform", uni["ranks"])):
                ad = workdir / f"adapter-{label}-{dtype}".replace("torch.", "")
                extract_adapter(base, tuned, {k: v for k, v in ranks.items() if v}, ad, progress=False)
                errs[label] = logits_error(base, tuned, ad)
            print(
                f"budget {args.budget}: allocation {alloc['parameters']} parameters, weight error "
                f"{alloc['relative_error']:.3e}, logits error {errs['allocated']:.3e}; uniform rank {uni['rank']} "
                f"({uni['parameters']} parameters), weight error {uni['relative_error']:.3e}, logits error "
                f"{errs['uniform']:.3e}"
            )
            print(
                "  allocated ranks: " + ", ".join(f"{k.split('.', 2)[-1]}={v}" for k, v in alloc["ranks"].items() if v)
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
