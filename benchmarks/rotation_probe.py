"""Probe (docs/allocation.md section 6o): sparsify the residual stream's reads in a rotated basis.

The inputs of q/k/v and gate/up are ``g ⊙ n(r)``: the residual stream ``r`` divided by its RMS, times the norm's weight
``g``. RMS is invariant under an orthogonal ``Q``, so a model whose residual stream is ``r Q`` (embeddings ``E Q``,
every write ``Q^T W``, every read ``W diag(g) Q diag(1/g')``, the norms' weights ``g'``) computes the same function
dense, while its masks select coordinates of ``n(r) Q`` instead of ``n(r)``. This is a weight transform only (the
exported graph and kernels are unchanged). ``Q`` here: the eigenvectors of ``E[n nᵀ]`` pooled over every norm of every
block on calibration text (PCA), which puts the variance in few coordinates. Variants:

* ``original``: the model as it is (the project's masks);
* ``fold``: ``Q = I``, norm weights folded into the reads (``g' = 1``): the masks rank ``n(r)`` without ``g``;
* ``pca``: ``Q`` = PCA, ``g' = 1``;
* ``pca-scaled``: ``Q`` = PCA, ``g'`` per norm the RMS of ``diag(g) Q`` 's columns (a rotated image of ``g``'s scale).

Perplexity on the first ``--max-tokens`` validation tokens (windows of 1024, top-k, uniform budgets unless
``--allocation``); PCA text: ``--calibration-windows`` windows of 512 tokens taken after them::

    nice -n 5 .venv/bin/python benchmarks/rotation_probe.py --data DATA/wiki.valid.raw --levels 0.4 0.5 \
        --output docs/results/allocation/rotation_probe_valid.json
"""

from __future__ import annotations

import copy
import time

import torch
from probe_common import load_probe, probe_parser, run_windows, write_output  # benchmarks/, the script's folder

from acttail_export.allocation import build_config
from acttail_export.evaluation import perplexity_windows

VARIANTS = ("original", "fold", "pca", "pca-scaled")


def _normalized(h: torch.Tensor, eps: float) -> torch.Tensor:
    h = h.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def residual_covariance(model, windows: torch.Tensor) -> torch.Tensor:
    """``E[n nᵀ]`` of the normalized residual stream, pooled over every norm that feeds projections."""
    norms = [m for layer in model.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    d = model.config.hidden_size
    acc = {"c": torch.zeros(d, d, dtype=torch.float64), "n": 0}

    def hook(module, args):
        n = _normalized(args[0], module.variance_epsilon).reshape(-1, d)
        acc["c"] += n.T @ n
        acc["n"] += n.shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    run_windows(model, windows, handles)
    return acc["c"] / acc["n"]


def rotate(model, q: torch.Tensor, scaled: bool):
    """A copy of ``model`` whose residual stream is ``r Q`` (see the module docstring); same function dense."""
    m = copy.deepcopy(model)
    q = q.double()
    emb = m.model.embed_tokens.weight
    lm_w = m.lm_head.weight.detach().double().clone()
    with torch.no_grad():
        emb.copy_((emb.double() @ q).to(emb.dtype))

        def read(linears, norm):
            g = norm.weight.detach().double()
            gq = torch.diag(g) @ q
            g_new = gq.pow(2).mean(0).sqrt() if scaled else torch.ones_like(g)
            for lin in linears:
                w = lin.weight.double()
                lin.weight.copy_((w @ gq / g_new).to(lin.weight.dtype))
            norm.weight.copy_(g_new.to(norm.weight.dtype))

        def write(lin):
            assert lin.bias is None, "a write with a bias would need it rotated too"
            lin.weight.copy_((q.T @ lin.weight.double()).to(lin.weight.dtype))

        for layer in m.model.layers:
            read([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], layer.input_layernorm)
            write(layer.self_attn.o_proj)
            read([layer.mlp.gate_proj, layer.mlp.up_proj], layer.post_attention_layernorm)
            write(layer.mlp.down_proj)
        g = m.model.norm.weight.detach().double()
        m.lm_head.weight = torch.nn.Parameter((lm_w * g @ q).to(emb.dtype))  # untied: the embedding is rotated apart
        m.model.norm.weight.fill_(1.0)
    m.config.tie_word_embeddings = False
    return m


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.4])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--allocation", default="uniform", choices=("uniform", "htsr"))
    ap.add_argument("--calibration-windows", type=int, default=8, help="PCA text: windows of 512 after the evaluation's")
    args = ap.parse_args()
    model, _, windows, calib = load_probe(args, args.calibration_windows)
    start = time.perf_counter()
    cov = residual_covariance(model, calib)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    pca = eigvecs.flip(-1)
    print(f"PCA on {calib.numel()} tokens ({time.perf_counter() - start:.0f} s); top-10 eigenvalue share "
          f"{float(eigvals.flip(0)[:10].sum() / eigvals.sum()):.3f}", flush=True)
    rows = []
    dense = perplexity_windows(model, windows, progress=False)["perplexity"]
    for variant in args.variants:
        if variant == "original":
            m = model
        else:
            q = torch.eye(model.config.hidden_size, dtype=torch.float64) if variant == "fold" else pca
            m = rotate(model, q, scaled=variant == "pca-scaled")
        dense_v = perplexity_windows(m, windows, progress=False)["perplexity"]
        for level in args.levels:
            config = build_config(m, level, args.allocation, "topk")
            ppl = perplexity_windows(m, windows, config, "topk", progress=False)["perplexity"]
            rows.append({"variant": variant, "level": level, "allocation": args.allocation, "perplexity": ppl,
                         "dense_perplexity": dense_v})
            print(f"{variant:10s} {level:.2f}: perplexity {ppl:.3f} (dense {dense_v:.3f})", flush=True)
    write_output(args, {"tokens": int(windows.numel()), "pca_tokens": int(calib.numel()), "dense": dense, "rows": rows})


if __name__ == "__main__":
    main()
