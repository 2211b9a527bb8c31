"""Adapter arithmetic on safetensors tensors: `ftcli merge`. No base model is loaded.

For every adapted module with A_i (r_i×k), B_i (d×r_i) and scale s_i (alpha/r, or alpha/√r with rsLoRA, read
from each adapter's config), the target is ΔW = Σ w_i s_i B_i A_i (or, for ties/dare, a function of the
per-adapter ΔW_i = s_i B_i A_i). The output folds every scale into the factors: its config has lora_alpha == r
(scale 1) and use_rslora false, so inputs with different alphas, ranks or rsLoRA combine exactly.

- cat        B = [w_1 s_1 B_1 | w_2 s_2 B_2 | …], A = [A_1; A_2; …]: exact, rank Σr_i.
- linear     Σ w_i s_i B_i A_i on ΔW (not on A and B separately, which adds cross terms: huggingface/peft#3004);
             stored exactly in the cat form (rank Σr_i), or SVD-truncated to --rank when given.
- svd        ΔW truncated to --rank (default: the largest input rank) without forming the d×k matrix: QR of the
             stacked B and of the stacked Aᵀ, SVD of the small core R_B R_Aᵀ, mapped back. Exact when
             --rank ≥ Σr_i.
- ties       trim each w_i ΔW_i to its top --density fraction by magnitude, elect the sign of the sum per entry,
             average the entries that agree with it (Yadav et al. 2023, arXiv 2306.01708).
- dare_linear  drop each entry of ΔW_i with probability 1 − density, rescale by 1/density, weighted sum
- dare_ties    the same drop-and-rescale, then TIES' sign election and disjoint mean (Yu et al. 2023,
               arXiv 2311.03099). Masks are seeded per (--seed, module, input position).
ties and dare_* need the dense ΔW per module; the result is stored as a rank --rank adapter (default: the largest
input rank) through an SVD, and the relative Frobenius truncation error ‖ΔW − B A‖/‖ΔW‖ is reported per
module.

All arithmetic runs in float64; the output is stored in the inputs' dtype.

Mixture-of-experts adapters (PEFT `target_parameters` on the experts' 3-D weights) hold every expert's factors in
one pair: lora_A [experts·r, in] (expert-major) and lora_B [out, r·experts] (expert-minor). They are split into one
module per expert (`NAME@expert3`), merged like any other module, and packed back in the same layout.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ftcli.errors import UserError

METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties")
DENSE_METHODS = ("ties", "dare_linear", "dare_ties")
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
REPORT_FILE = "merge.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")

# names of the factor tensors, as PEFT writes them: (A key suffix, B key suffix)
_KINDS = {"lora": (".lora_A.weight", ".lora_B.weight"), "embedding": (".lora_embedding_A", ".lora_embedding_B")}
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<what>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")

# config settings that change what the stored factors mean; an adapter using any of them is refused
_REFUSED_SETTINGS = {
    "use_dora": "DoRA (a magnitude vector rescales W + ΔW, so adapters do not add as ΔW)",
    "lora_bias": "a trained bias on lora_B",
    "modules_to_save": "fully trained modules (modules_to_save) that are not low-rank factors",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
}


# ------------------------------------------------------------------------------------------------------------
# reading


@dataclass
class Adapter:
    path: Path  # the safetensors file
    config: dict
    factors: dict[str, tuple]  # module → (A, B, kind); a stacked experts' pair split into NAME@expertE modules
    dtype: object = None
    stacked: dict[str, int] = field(default_factory=dict)  # experts' module → number of experts

    @property
    def folder(self) -> Path:
        return self.path.parent

    def scale(self, module: str) -> float:
        """alpha/r (or alpha/√r with rsLoRA), r the rank stored for this module."""
        r = self.factors[module][0].shape[0]
        alpha = float(self.config.get("lora_alpha", r))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def adapter_paths(spec) -> tuple[Path, Path]:
    """A folder, a run folder (with adapter/) or an adapter_model.safetensors file → (weights file, config file)."""
    from ftcli.run_folder import RunFolder

    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / CONFIG_FILE).is_file() and RunFolder.holds_run(p):
            run = RunFolder(p)
            if run.kind == "model":
                raise UserError(f"{spec}: this run wrote full weights (model/), not a LoRA adapter; nothing to merge")
            p = run.require_artifact()
        weights, config = p / ADAPTER_FILE, p / CONFIG_FILE
    elif p.is_file():
        if p.suffix != ".safetensors":
            raise UserError(f"{spec}: not a .safetensors file (pickle adapters are not read)")
        weights, config = p, p.parent / CONFIG_FILE
    else:
        raise UserError(f"{spec}: no such adapter folder or file")
    if not weights.is_file():
        raise UserError(f"{spec}: no {ADAPTER_FILE} in {weights.parent}")
    if not config.is_file():
        raise UserError(f"{spec}: no {CONFIG_FILE} beside {weights.name} (needed for the rank, alpha and targets)")
    return weights, config


def read_adapter(spec) -> Adapter:
    from safetensors.torch import load_file

    weights, config_file = adapter_paths(spec)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file}: not valid JSON ({e})") from None
    _check_config(config, config_file)
    tensors = load_file(str(weights))
    parts: dict[str, dict] = {}
    for key, t in tensors.items():
        if "lora_magnitude_vector" in key:
            raise UserError(f"{weights}: {key} is a DoRA magnitude vector; DoRA adapters cannot be merged as ΔW "
                            "(fold each into its base with `ftcli export` instead)")
        m = _KEY.match(key)
        if not m:
            what = "a lora_B bias" if key.endswith(".bias") and ".lora_B" in key else "not a LoRA factor"
            raise UserError(f"{weights}: tensor {key} is {what}; only plain LoRA factors (lora_A/lora_B) are merged")
        parts.setdefault(m["module"], {})[m["what"]] = t
    factors = {}
    for module, d in sorted(parts.items()):
        kind = "embedding" if "lora_embedding_A" in d or "lora_embedding_B" in d else "lora"
        a_key, b_key = (s.lstrip(".") for s in _KINDS[kind])
        if a_key not in d or b_key not in d:
            raise UserError(f"{weights}: module {module} has {'/'.join(sorted(d))} but not both lora_A and lora_B")
        A, B = d[a_key], d[b_key]
        if A.ndim != 2 or B.ndim != 2:
            raise UserError(f"{weights}: module {module}: lora_A {_shape(A)} and lora_B {_shape(B)} are not matrices "
                            "(convolution adapters are not supported)")
        if A.shape[0] != B.shape[1]:
            raise UserError(f"{weights}: module {module}: lora_A {_shape(A)} and lora_B {_shape(B)} disagree on the "
                            "rank")
        stacked = config.get("target_parameters") and config.get("r") and A.shape[0] % config["r"] == 0  # experts
        if not config.get("rank_pattern") and A.shape[0] != config.get("r", A.shape[0]) and not stacked:
            raise UserError(f"{weights}: module {module} has rank {A.shape[0]} but {CONFIG_FILE} says r="
                            f"{config.get('r')}")
        for name, t in ((a_key, A), (b_key, B)):
            if not t.is_floating_point() or not bool(t.isfinite().all()):
                raise UserError(f"{weights}: module {module}: {name} contains NaN/inf or is not floating point")
        factors[module] = (A, B, kind)
    if not factors:
        raise UserError(f"{weights}: no LoRA factors inside")
    dtypes = {t.dtype for t in tensors.values()}
    adapter = Adapter(path=weights, config=config, factors=factors, dtype=dtypes.pop() if len(dtypes) == 1 else None)
    if config.get("target_parameters"):
        _split_experts(adapter, weights)
    return adapter


def _split_experts(adapter: Adapter, where: Path) -> None:
    """PEFT's stacked expert factors → one module per expert (module docstring)."""
    r = adapter.config.get("r")
    for module, (A, B, kind) in list(adapter.factors.items()):
        if not r or A.shape[0] == r:
            continue
        if A.shape[0] % r:
            raise UserError(f"{where}: module {module}: lora_A has {A.shape[0]} rows, not a multiple of r={r}")
        n = A.shape[0] // r
        del adapter.factors[module]
        experts_A = A.reshape(n, r, A.shape[1])
        experts_B = B.reshape(B.shape[0], r, n)
        for e in range(n):
            adapter.factors[f"{module}{_EXPERT}{e}"] = (experts_A[e].contiguous(), experts_B[:, :, e].contiguous(), kind)
        adapter.stacked[module] = n


_EXPERT = "@expert"


def _pack_experts(tensors: dict, stacked: dict[str, int]) -> dict:
    """The per-expert factors of merged modules packed back into PEFT's layout."""
    import torch

    for module, n in stacked.items():
        a_suffix, b_suffix = _KINDS["lora"]
        As = [tensors.pop(f"{module}{_EXPERT}{e}{a_suffix}") for e in range(n)]
        Bs = [tensors.pop(f"{module}{_EXPERT}{e}{b_suffix}") for e in range(n)]
        tensors[module + a_suffix] = torch.cat(As, dim=0).contiguous()
        tensors[module + b_suffix] = torch.stack(Bs, dim=2).reshape(Bs[0].shape[0], -1).contiguous()
    return tensors


def _check_config(config: dict, where: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{where}: peft_type {config.get('peft_type')!r}; only LoRA adapters are merged")
    for key, what in _REFUSED_SETTINGS.items():
        if config.get(key):
            raise UserError(f"{where}: {key}={config[key]!r}: {what} cannot be merged here")
    if config.get("bias", "none") != "none":
        raise UserError(f"{where}: bias={config['bias']!r}: adapters that train biases cannot be merged here")
    if config.get("alpha_pattern"):
        raise UserError(f"{where}: alpha_pattern is set (per-module alphas); not supported by ftcli merge")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        raise UserError(f"{where}: init_lora_weights={init!r} changes the base weights, so this adapter is not a "
                        "ΔW on the original base; convert it to a plain LoRA first (PEFT: "
                        "path_initial_model_for_weight_conversion)")


def _shape(t) -> str:
    return "×".join(str(s) for s in t.shape)


def check_compatible(adapters: list[Adapter]) -> list[str]:
    """The modules to merge, after checking that every adapter has the same modules, shapes and base."""
    first = adapters[0]
    for other in adapters[1:]:
        if sorted(first.config.get("target_parameters") or []) != sorted(other.config.get("target_parameters") or []):
            raise UserError(f"{first.path} and {other.path} adapt different parameter tensors (target_parameters: "
                            "experts or routers); PEFT loads only adapters with the same ones together")
        b0, b1 = first.config.get("base_model_name_or_path"), other.config.get("base_model_name_or_path")
        if b0 and b1 and b0 != b1:
            raise UserError(f"different base models: {first.path} is for {b0!r} but {other.path} is for {b1!r}")
        if bool(first.config.get("fan_in_fan_out")) != bool(other.config.get("fan_in_fan_out")):
            raise UserError(f"{first.path} and {other.path} disagree on fan_in_fan_out")
        for module in sorted(set(first.factors) | set(other.factors)):
            if module not in other.factors:
                raise UserError(f"module {module} is in {first.path} but not in {other.path}")
            if module not in first.factors:
                raise UserError(f"module {module} is in {other.path} but not in {first.path}")
            (A0, B0, k0), (A1, B1, k1) = first.factors[module], other.factors[module]
            if k0 != k1:
                raise UserError(f"module {module}: an embedding adapter in one file and a linear one in the other")
            s0, s1 = (B0.shape[0], A0.shape[1]), (B1.shape[0], A1.shape[1])
            if s0 != s1:
                raise UserError(f"module {module}: shape mismatch, ΔW is {s0[0]}×{s0[1]} in {first.path} "
                                f"but {s1[0]}×{s1[1]} in {other.path}")
    return sorted(first.factors)


# ------------------------------------------------------------------------------------------------------------
# the arithmetic (float64 tensors in, float64 factors out)


def lowrank_svd_batched(B, A, rank: int):
    """The best rank-`rank` factorisation of each B @ A without forming it, over a batch of same-shaped modules
    (B b×d×n, A b×n×k): (B_out b×d×r, A_out b×r×k, [relative Frobenius truncation error per module]).

    Never forms the d×k matrix. With A Aᵀ = L Lᵀ (Cholesky; R_A = Lᵀ, Q_A = Aᵀ L⁻ᵀ orthonormal) and
    B A = B L (Q_A)ᵀ, the SVD of B A comes from the eigendecomposition V Λ Vᵀ of the small n×n matrix
    Lᵀ (BᵀB) L: singular values √Λ, left vectors B L V Λ^-½, right vectors Q_A V. So
        B_out = B L V_r Λ_r^-¼,   A_out = Λ_r^¼ V_rᵀ L⁻¹ A
    (each factor gets √S_r). Everything tall is a matrix product (two Gram matrices, two output products);
    the O(n³) work is one Cholesky, one eigh and one triangular solve per module, batched over modules of
    the same shape. Whatever the accuracy of V, B_out A_out = B L V_r V_rᵀ L⁻¹ A, so at full rank it is B A
    up to rounding. Directions with a negligible singular value keep the same product unbalanced instead of
    dividing by ~0. A batch item whose A Aᵀ is singular or badly conditioned (e.g. an adapter stacked with its
    own negative) takes the Householder QR route in float64 instead: QR of B and of Aᵀ, SVD of the core.
    """
    import torch

    work = B.dtype
    eps = torch.finfo(work).eps
    n_in = B.shape[-1]
    n = min(rank, n_in, B.shape[-2], A.shape[-1])
    L, info = torch.linalg.cholesky_ex(A @ A.mT)
    ok = (info == 0) & (_diag_ratio(L) > (1e-3 if work != torch.float64 else 1e-6))
    errors = [0.0] * B.shape[0]
    good = ok.nonzero().flatten().tolist()
    everything = len(good) == B.shape[0]
    if not everything:
        B_out = B.new_zeros(B.shape[0], B.shape[1], n)
        A_out = A.new_zeros(A.shape[0], n, A.shape[2])
    if good:
        L, Bg, Ag = (L, B, A) if everything else (L[good], B[good], A[good])
        M = L.mT @ (Bg.mT @ Bg) @ L
        ev, V = torch.linalg.eigh((M + M.mT) / 2)
        ev, V = ev.flip(-1).clamp(min=0), V.flip(-1)
        S = ev.sqrt()
        Sr, Vr = S[:, :n], V[:, :, :n]
        tiny = Sr <= Sr[:, :1] * eps * n_in * 10
        D = torch.where(tiny, torch.ones_like(Sr), Sr.clamp(min=torch.finfo(work).tiny).rsqrt())  # Λ^-¼
        Bo = Bg @ ((L @ Vr) * D[:, None, :])
        # Λ^¼ Vᵀ L⁻¹ solved from the right against L itself rather than Lᵀ X = V Λ^¼ transposed: no copies of
        # transposed operands, and the product after it reads a contiguous matrix (docs/merge.md, "On an AMD EPYC")
        Ao = torch.linalg.solve_triangular(L, (Vr / D[:, None, :]).mT, upper=False, left=False) @ Ag
        if everything:
            B_out, A_out = Bo, Ao
        else:
            B_out[good], A_out[good] = Bo, Ao
        for j, i in enumerate(good):
            errors[i] = _tail_error(S[j].double(), n)
    for i in (~ok).nonzero().flatten().tolist():
        b, a, errors[i] = _qr_svd(B[i].double(), A[i].double(), n)
        r = b.shape[1]
        B_out[i, :, :r], A_out[i, :r] = b.to(work), a.to(work)
    return B_out, A_out, errors


def _on_threads(fn, groups: list[list[str]], cost=len):
    """(names, fn(names)) for every group, the groups split across torch's threads: each part runs on one thread
    with torch single-threaded meanwhile (LAPACK's Cholesky and eigh solve a batch one matrix after another, and
    the batched products of one part are small). The parts start costliest first (`cost(names)`), so the last to
    finish is a small one. torch's thread count is process-wide: it is set back before this returns. Measured
    (`python scripts/bench_merge.py 128 2`, 2 cores, 210 modules): 0.21–0.22 s → 0.19 s; costliest first, a median
    of 12 calls 169 → 156 ms (docs/merge.md)."""
    import torch
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    parts = [part for names in groups for part in _split(names, threads)]
    if threads < 2 or len(parts) < 2:
        return [(names, fn(names)) for names in parts]
    parts.sort(key=cost, reverse=True)
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(zip(parts, pool.map(fn, parts)))
    finally:
        torch.set_num_threads(threads)


def _split(names: list[str], parts: int) -> list[list[str]]:
    size = -(-len(names) // parts)
    return [names[i : i + size] for i in range(0, len(names), size)]


def _diag_ratio(L):
    d = L.diagonal(dim1=-2, dim2=-1).abs()
    return d.min(-1).values / d.max(-1).values.clamp(min=1e-300)


def _qr_svd(B, A, rank: int):
    """The Householder QR form of lowrank_svd_batched: robust to rank-deficient factors."""
    import torch

    Qb, Rb = torch.linalg.qr(B)  # d×m, m×n
    Qa, Ra = torch.linalg.qr(A.T)  # k×m', m'×n
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    return (Qb @ U[:, :r]) * root, root[:, None] * (Vh[:r] @ Qa.T), _tail_error(S, r)


def dense_svd(delta, rank: int, seed: int = 0):
    """A rank-`rank` factorisation of a dense matrix and its relative Frobenius error ‖ΔW − B A‖/‖ΔW‖.

    Small matrices, or ranks above a quarter of the smaller side, get the exact SVD (the best approximation).
    Otherwise a seeded randomised SVD (Halko et al. 2011: range finder with 4 power iterations, 16 extra
    columns), which costs O(d·k·rank) instead of a full SVD; the error reported is then measured directly, so it
    is exact even where the approximation is slightly worse than the best one."""
    import torch

    small = min(delta.shape)
    if small <= 256 or rank * 4 >= small:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, S.numel())
        root = S[:r].sqrt()
        return U[:, :r] * root, root[:, None] * Vh[:r], _tail_error(S, r)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(delta, q=min(rank + 16, small), niter=4)
    root = S[:rank].sqrt()
    B, A = U[:, :rank] * root, root[:, None] * V[:, :rank].T
    total = float(delta.norm())
    return B, A, float((delta - B @ A).norm()) / total if total > 0 else 0.0


def _tail_error(S, r: int) -> float:
    total = float(S.pow(2).sum())
    return math.sqrt(float(S[r:].pow(2).sum()) / total) if total > 0 else 0.0


def trim(delta, density: float):
    """Keep the top `density` fraction of entries by magnitude (TIES' trim), zero the rest."""
    import torch

    k = int(round(density * delta.numel()))
    if k >= delta.numel():
        return delta
    flat = delta.reshape(-1)
    out = torch.zeros_like(flat)
    if k > 0:
        idx = flat.abs().topk(k).indices
        out[idx] = flat[idx]
    return out.reshape(delta.shape)


def drop(delta, density: float, generator):
    """DARE: drop each entry with probability 1 − density and rescale the survivors by 1/density."""
    import torch

    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    return delta * keep / density


def sign_merge(deltas):
    """TIES' elect and disjoint merge on already weighted deltas: the sign of the sum per entry, then the mean of
    the entries that agree with it (an entry whose elected sign is 0 stays 0)."""
    import torch

    T = torch.stack(deltas)
    elected = T.sum(0).sign()
    agree = (T.sign() == elected) & (T != 0)
    return (T * agree).sum(0) / agree.sum(0).clamp(min=1)


def module_seed(seed: int, module: str, index: int) -> int:
    """A stable per-(seed, module, input) seed, independent of Python's hash randomisation."""
    return zlib.crc32(f"{seed}:{module}:{index}".encode())


def combine(method: str, factors: list[tuple], scales: list[float], weights: list[float], *, rank: Optional[int],
            density: Optional[float], seed: int, module: str):
    """One module by an exact (cat, linear without a rank) or dense (ties, dare) method: [(A_i, B_i)] (float64)
    → (B_out, A_out, truncation error). The low-rank methods run batched over modules (lowrank_svd_batched)."""
    import torch

    Bs = [w * s * B for (A, B), s, w in zip(factors, scales, weights)]
    As = [A for A, _ in factors]
    if method == "cat" or method == "linear":
        return torch.cat(Bs, dim=1), torch.cat(As, dim=0), 0.0
    deltas = [B @ A for B, A in zip(Bs, As)]  # w_i s_i B_i A_i
    if method == "ties":
        delta = sign_merge([trim(d, density) for d in deltas])
    else:
        dropped = [drop(d, density, torch.Generator().manual_seed(module_seed(seed, module, i)))
                   for i, d in enumerate(deltas)]
        delta = sum(dropped) if method == "dare_linear" else sign_merge(dropped)
    return dense_svd(delta, rank, seed=module_seed(seed, module, -1))


# ------------------------------------------------------------------------------------------------------------
# the command


@dataclass
class ModuleResult:
    name: str
    shape: tuple[int, int]  # ΔW: d×k
    in_ranks: list[int]
    rank: int  # the rank this module needs (before padding to the adapter's common rank)
    error: Optional[float]  # relative Frobenius truncation error; None in a dry run where it is not computed


@dataclass
class MergeResult:
    method: str
    inputs: list[str]
    weights: list[float]
    rank: int  # the output adapter's r (= lora_alpha)
    density: Optional[float]
    seed: int
    modules: list[ModuleResult] = field(default_factory=list)
    out: Optional[Path] = None
    dry_run: bool = False

    @property
    def max_error(self) -> float:
        return max((m.error or 0.0 for m in self.modules), default=0.0)

    def as_dict(self) -> dict:
        return {
            "method": self.method, "inputs": self.inputs, "weights": self.weights, "rank": self.rank,
            "lora_alpha": self.rank, "density": self.density, "seed": self.seed, "max_error": self.max_error,
            "modules": [{"name": m.name, "shape": list(m.shape), "in_ranks": m.in_ranks, "rank": m.rank,
                         "error": m.error} for m in self.modules],
        }


def merge_adapters(inputs: list, method: str, weights: Optional[list[float]] = None, rank: Optional[int] = None,
                   density: Optional[float] = None, seed: int = 0, out=None, dry_run: bool = False,
                   overwrite: bool = False) -> MergeResult:
    """Combine LoRA adapters (folders or adapter_model.safetensors files) into a new PEFT adapter folder `out`."""
    _check_arguments(inputs, method, weights, rank, density, out, dry_run, overwrite)
    weights = [1.0] * len(inputs) if weights is None else [float(w) for w in weights]
    adapters = [read_adapter(p) for p in inputs]
    result, tensors = merge_loaded(adapters, method, weights, rank, density, seed, dry_run=dry_run)
    if not dry_run:
        result.out = Path(out)
        modules = [m.name for m in result.modules]
        _write(Path(out), adapters, tensors, _output_config(adapters, modules, result.rank), result)
    return result


def merge_loaded(adapters: list[Adapter], method: str, weights: list[float], rank: Optional[int] = None,
                 density: Optional[float] = None, seed: int = 0, dry_run: bool = False) -> tuple[MergeResult, dict]:
    """The arithmetic of merge_adapters on adapters already read: (result, {tensor name: tensor}) in PEFT's
    naming, every module padded to the output rank, in the inputs' dtype."""
    import torch

    modules = check_compatible(adapters)
    max_in = max(A.shape[0] for a in adapters for A, _, _ in a.factors.values())
    if rank is None and method in ("svd", *DENSE_METHODS):
        rank = max_in
    lowrank = method == "svd" or (method == "linear" and rank is not None)
    result = MergeResult(method=method, inputs=[str(a.path) for a in adapters], weights=weights, rank=0,
                         density=density, seed=seed, dry_run=dry_run)

    merged: dict[str, tuple] = {}  # module → (A, B, error, finiteness already checked)
    stacked: dict[str, tuple] = {}  # module → (factors, scales, working dtype): low-rank SVD, batched by shape
    for module in modules:
        A0, B0, kind = adapters[0].factors[module]
        shape = (B0.shape[0], A0.shape[1])
        in_ranks = [a.factors[module][0].shape[0] for a in adapters]
        full = min(sum(in_ranks), *shape)
        if dry_run:
            need = min(rank, *shape) if method in DENSE_METHODS else min(rank, full) if lowrank else sum(in_ranks)
            exact = not (method in DENSE_METHODS or (lowrank and need < full))
            result.modules.append(ModuleResult(module, shape, in_ranks, need, 0.0 if exact else None))
            continue
        factors = [a.factors[module][:2] for a in adapters]
        scales = [a.scale(module) for a in adapters]
        if lowrank:  # float32 working precision here (float64 inputs stay float64): see lowrank_svd_batched
            work = torch.float64 if any(a.factors[module][0].dtype == torch.float64 for a in adapters) else \
                torch.float32
            if max(abs(w * s) for w, s in zip(weights, scales)) > 1e15:  # huge weights: work in float64
                work = torch.float64
            stacked[module] = (factors, scales, work)
        else:
            factors = [(A.to(torch.float64), B.to(torch.float64)) for A, B in factors]
            B, A, err = combine(method, factors, scales, weights, rank=rank, density=density, seed=seed,
                                module=module)
            merged[module] = (A, B, err, False)
    groups: dict[tuple, list[str]] = {}
    for module, (factors, _, work) in stacked.items():
        key = (factors[0][1].shape[0], factors[0][0].shape[1], tuple(A.shape[0] for A, _ in factors), work)
        groups.setdefault(key, []).append(module)

    def dims(names: list[str]) -> tuple[int, int, int]:
        """(d, k, n) of a shape group: ΔW is d×k, n the sum of the input ranks."""
        factors = stacked[names[0]][0]
        return factors[0][1].shape[0], factors[0][0].shape[1], sum(A.shape[0] for A, _ in factors)

    def factor(names: list[str]) -> list[tuple]:
        """(A, B, error, finite) of modules of one shape: B' = [w_i s_i B_i] and A' = [A_i] written straight into
        one batch tensor each, factored together."""
        (d, k, n), work = dims(names), stacked[names[0]][2]
        Bs, As = torch.empty(len(names), d, n, dtype=work), torch.empty(len(names), n, k, dtype=work)
        for i, m in enumerate(names):
            factors, scales, _ = stacked[m]
            at = 0
            for (A, B), s, w in zip(factors, scales, weights):
                r = A.shape[0]
                torch.mul(B, w * s, out=Bs[i, :, at : at + r]) if B.dtype == work else Bs[i, :, at : at + r].copy_(
                    B.to(work) * (w * s))
                As[i, at : at + r].copy_(A)
                at += r
        B_out, A_out, errors = lowrank_svd_batched(Bs, As, rank)
        # one sum per module reads each output once: finite sums mean finite entries (else each entry is checked)
        finite = torch.isfinite(B_out.sum(dim=(1, 2)) + A_out.sum(dim=(1, 2))).tolist()
        return [(A_out[i], B_out[i], errors[i], finite[i]) for i in range(len(names))]

    def cost(names: list[str]) -> int:
        """The work of factoring `names` together: n²(d + k + n) per module (its products and n×n steps)."""
        d, k, n = dims(names)
        return len(names) * n * n * (d + k + n)

    for names, results in _on_threads(factor, list(groups.values()), cost):
        merged.update(zip(names, results))
    if dry_run:
        result.rank = max(m.rank for m in result.modules)
        return result, {}

    for module in modules:
        A, B, err, _ = merged[module]
        A0, B0, _ = adapters[0].factors[module]
        result.modules.append(ModuleResult(module, (B0.shape[0], A0.shape[1]),
                                           [a.factors[module][0].shape[0] for a in adapters], A.shape[0], err))
    result.rank = max(m.rank for m in result.modules)
    dtypes = {a.dtype for a in adapters}
    dtype = dtypes.pop() if len(dtypes) == 1 and None not in dtypes else torch.float32
    tensors = {}
    for module in modules:
        A, B, _, checked = merged[module]
        kind = adapters[0].factors[module][2]
        pad = result.rank - A.shape[0]  # modules that need a lower rank get zero rows/columns: no effect
        if pad:
            A = torch.cat([A, A.new_zeros(pad, A.shape[1])], dim=0)
            B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
        a_suffix, b_suffix = _KINDS[kind]
        cast = A.dtype != dtype
        A, B = A.to(dtype).contiguous(), B.to(dtype).contiguous()
        if (cast or not checked) and not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
            raise UserError(f"module {module}: the merged factors contain NaN/inf"
                            + (f" (they overflow {dtype})" if cast else "") + f" (weights {weights})")
        tensors[module + a_suffix] = A
        tensors[module + b_suffix] = B
    return result, _pack_experts(tensors, adapters[0].stacked)


def _check_arguments(inputs, method, weights, rank, density, out, dry_run, overwrite) -> None:
    if method not in METHODS:
        raise UserError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if len(inputs) < 1:
        raise UserError("give at least one adapter to merge")
    if weights is not None and len(weights) != len(inputs):
        raise UserError(f"--weights has {len(weights)} values for {len(inputs)} adapters")
    if weights is not None and not all(math.isfinite(float(w)) for w in weights):
        raise UserError(f"--weights {weights}: every weight must be a finite number")
    if rank is not None and rank < 1:
        raise UserError(f"--rank {rank}: must be at least 1")
    if method == "cat" and rank is not None:
        raise UserError("--rank does not apply to cat (its rank is the sum of the input ranks); use svd or linear")
    if method in DENSE_METHODS:
        if density is None:
            raise UserError(f"{method} needs --density: the fraction of each ΔW's entries kept, in (0, 1]")
        if not 0.0 < density <= 1.0:
            raise UserError(f"--density {density}: must be in (0, 1]")
    elif density is not None:
        raise UserError(f"--density applies to ties, dare_linear and dare_ties, not {method}")
    if not dry_run:
        if out is None:
            raise UserError("--out is required (a new adapter folder)")
        o = Path(out)
        if o.suffix == ".safetensors":
            raise UserError(f"--out {out}: give a folder; it will hold {ADAPTER_FILE} and {CONFIG_FILE}")
        if o.exists() and not overwrite:
            raise UserError(f"--out {out} exists; pass --overwrite to replace it")


def _output_config(adapters: list[Adapter], modules: list[str], rank: int) -> dict:
    config = {k: v for k, v in adapters[0].config.items()}
    targets = [a.config.get("target_modules") for a in adapters]
    same = all(t == targets[0] for t in targets) and all(
        a.config.get("layers_to_transform") == adapters[0].config.get("layers_to_transform") for a in adapters)
    if not same or not targets[0]:
        # the exact set of modules: PEFT matches a list entry against the end of a module's name; modules adapted
        # through target_parameters (experts, routers) stay there
        params = {t.rsplit(".", 1)[0] for t in config.get("target_parameters") or []}
        names = {m.split(_EXPERT)[0].removeprefix("base_model.model.").replace(".base_layer", "") for m in modules}
        config["target_modules"] = sorted(names - params) or None
        config["layers_to_transform"] = None
        config["layers_pattern"] = None
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={}, use_dora=False,
                  init_lora_weights=True, inference_mode=True)
    if "exclude_modules" in config and not same:
        config["exclude_modules"] = None
    return config


def _write(out: Path, adapters: list[Adapter], tensors: dict, config: dict, result: MergeResult) -> None:
    from safetensors.torch import save_file

    from ftcli import atomic

    with atomic.folder(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / REPORT_FILE).write_text(json.dumps(result.as_dict(), indent=2) + "\n", encoding="utf-8")
        src = adapters[0].folder  # a run's adapter folder carries the tokenizer: keep it with the merge
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
