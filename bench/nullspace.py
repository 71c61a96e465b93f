"""How much null space AlphaEdit finds on a model: the spectrum of MEMIT's key statistics, layer by layer.

    python bench/nullspace.py --data ../shared/benchmarks [--model NAME] [--out FILE.json]

AlphaEdit projects each update onto the eigenvectors of the preserved keys' second moment C = E[k k^T] whose
eigenvalues are below a threshold (`nullspace_threshold`, 2e-2 by default, AlphaEdit's Llama-3-8B value). On a
small model whose keys fill their space, that null space can be small or empty, and then AlphaEdit cannot edit
without touching preserved keys. For the layers AlphaEdit edits by default, this prints the key dimension, the
projector's rank at the default threshold and at a few others, and quantiles of C's eigenvalues. The statistics
are the very ones `corsa edit --method alphaedit` uses (same corpus, same cache), so nothing here is estimated
differently from an edit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from corsa import artifacts, models
from corsa.methods.alphaedit import AlphaEditConfig, null_space_projector
from corsa.methods.memit import decoder_layers, default_layers, second_moments

THRESHOLDS = (1e-3, 1e-2, 1e-1)  # beside the default, whose rank is the projector's own
QUANTILES = (0.0, 0.01, 0.1, 0.5, 0.9, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="benchmarks folder (its CounterFact train split feeds C)")
    ap.add_argument("--model", default=None, help="model name or path (default: corsa's default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the table as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, _ = models.load_model(args.model)
    cfg = AlphaEditConfig(stats_data=args.data)
    layers = cfg.layers or default_layers(len(decoder_layers(model)))
    moments = second_moments(model, tok, layers, cfg)
    rows = []
    for layer in layers:
        c = moments[layer]
        values = torch.linalg.eigvalsh(c.double())
        rows.append({
            "layer": layer, "key_dimension": int(c.shape[0]),
            "rank_at_default": null_space_projector(c, cfg.nullspace_threshold)[1],
            "rank_below": {f"{t:g}": int((values < t).sum()) for t in THRESHOLDS},
            "eigenvalue_quantiles": {f"{q:g}": float(torch.quantile(values, q)) for q in QUANTILES},
        })
    print(f"null space of the key statistics (threshold {cfg.nullspace_threshold:g} by default), "
          f"{cfg.mom2_n_samples} CounterFact train texts")
    print("| layer | key dimension | rank at default | " + " | ".join(f"rank < {t:g}" for t in THRESHOLDS)
          + " | eigenvalue min / median / max |")
    print("|---|---|---|" + "---|" * len(THRESHOLDS) + "---|")
    for r in rows:
        q = r["eigenvalue_quantiles"]
        print(f"| {r['layer']} | {r['key_dimension']} | {r['rank_at_default']} | "
              + " | ".join(str(v) for v in r["rank_below"].values())
              + f" | {q['0']:.2e} / {q['0.5']:.2e} / {q['1']:.2e} |")
    if args.out:
        artifacts.write_json(Path(args.out), {"model": models.canonical(args.model), "threshold": cfg.nullspace_threshold,
                                              "n_texts": cfg.mom2_n_samples, "layers": rows})


if __name__ == "__main__":
    main()
