"""`training.compile`: torch.compile where it pays, each decoder layer's blocks around attention.

Compiling the whole decoder does not pay on a CPU: ftcli's attention runs every example of a packed row on its own
span (ftcli/attention.py), a Python loop over the row's spans, so each new layout of examples is a new graph; on the
quickstart the first step had not finished compiling after 13 minutes (docs/benchmarks.md). What compiling fuses is
the elementwise work between the products (RMSNorm's upcast, square, mean, rsqrt and scales; SwiGLU; the casts),
and that lives in the blocks beside attention. So every child of every decoder layer is compiled on its own, in
place (`nn.Module.compile`: parameter names and saved adapters unchanged), with dynamic shapes (the token count
changes every pass), except attention and mixture-of-experts blocks (routing sizes depend on the data). A layer's
blocks share their code, so one graph per kind of block serves all layers; inductor caches the graphs on disk
(keyed on the graph; ftcli's commands put that cache in ftcli's own cache folder: runtime.tune_process), so a later
run of the same model reuses them, and a changed model or dtype compiles anew. Validation, generation and the
retention sets run eagerly (`eager`): their numbers are those of an uncompiled run, and generation's one-token steps
compile nothing. Measured (docs/benchmarks.md, 2 CPU cores): steps 3-8% faster after 8-15 s of compiling the first
time and 2-4 s from the cache; it pays from 100-250 steps, about 40 with the cache.
"""

from __future__ import annotations


def compile_layers(model) -> int:
    """Compile each decoder layer's blocks beside attention (see the module docstring); returns how many."""
    from ftcli.loss import causal_lm
    from ftcli.moe import is_moe

    decoder = causal_lm(model).get_decoder()
    n = 0
    for layer in getattr(decoder, "layers", []):
        for child in layer.children():
            if "attention" in type(child).__name__.lower() or is_moe(child):
                continue
            child.compile(dynamic=True)
            n += 1
    return n


def eager():
    """A context in which every compiled function runs its original Python (torch.compiler's force_eager)."""
    import torch

    return torch.compiler.set_stance("force_eager")
