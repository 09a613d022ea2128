"""Quality of hyperpass's approximations on a real model, at equal attention work.

A model of ``quality_models`` (``--model``: SmolLM2-135M at 8192 tokens, the default; Gemma 3
270M at 16k-32k tokens, whose 3 global layers are the ones hyperpass approximates):

* perplexity on two texts that install with Python (``quality_texts``: source code, English prose),
  exact attention vs each configuration, all 30 layers rewritten or only the last N;
* passkey retrieval: a 5-digit key hidden at several depths of an ~8192-token filler, asked back
  at the end; score = share of the key's tokens predicted right (teacher-forced argmax: the
  answer's tokens inside the approximated prefill), or, with ``--passkey-mode generate``, of the
  tokens greedy decoding writes after the prompt, as ``generate()`` answers (the prompt's
  prefill approximated, the decode steps exact);
* kernel level: Q/K/V captured from every causal layer on the code text; relative error of the
  output and of the log-sum-exp vs exact, per configuration.

Every row reports the attention work: query-key scores computed per query in a rewritten layer
(``keys_per_query``), counted from the configuration (for an adaptive budget: its cap) and, with
``--kernel-level``, counted from the blocks the selection chose on the captured Q/K/V
(``keys_per_query_measured``). Exact causal attention scores (N+1)/2.

Attention goes through the product's own path (``--route hf``, the default):
``hyperpass.register_hf`` registers the configuration as an ``attn_implementation``
(``last_n_layers`` for the rows that rewrite only the last layers, ``min_len=1``), the model
switches to it, and the row records how many calls hyperpass approximated and why the others
stayed exact (its routing report). ``--route router`` wraps SDPA instead (the earlier harness;
with ``--impl reference`` it calls the reference directly), and Q/K/V capture for the kernel
level always uses it.

Usage::

    python benchmarks/quality.py prepare --inputs .quality/inputs.pt     # token ids (CPU)
    python benchmarks/quality.py prepare --model gemma3 --n-tokens 32768 --inputs .quality/g32k.pt
    python benchmarks/quality.py run --inputs .quality/inputs.pt --configs exact,local1024_s16 \
        --out benchmarks/results/quality.json [--device cuda --impl reference]
    python benchmarks/quality.py report --out benchmarks/results/quality.json   # table + plot
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import quality_configs
import quality_models
import quality_texts
import torch
import torch.nn.functional as F

import hyperpass
import hyperpass.integrations.hf
import hyperpass.integrations.patching
from hyperpass.config import DEFAULT, HyperConfig
from hyperpass.reference import exact_attention, hyper_attention_reference
from hyperpass.reference.select import select_block_mask

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


# ----------------------------------------------------------------------------- attention routing
class Router:
    """Sends the SDPA calls of chosen layers to the approximation while the model runs.

    Attributes:
        layers: indices of the rewritten layers (empty: exact everywhere).
        params: the configuration's fields (a :class:`HyperConfig` override).
        impl: "op" (``hyperpass.hyper_attention``) or "reference" (the reference directly:
            the same function, without the op's CUDA kernels).
        capture: when a list, receives (layer, q, k, v, scale) of every causal call without
            a mask (the calls hyperpass approximates; Gemma 3's sliding-window layers are not).
    """

    def __init__(self, model, impl: str = "op"):
        self.model = model
        self.impl = impl
        self.layers: set[int] = set()
        self.params: dict = {}
        self.capture: list | None = None
        self.current = -1
        self.calls = {"approximated": 0, "exact": 0}
        self._original = F.scaled_dot_product_attention
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.register_forward_pre_hook(self._hook(index))

    def _hook(self, index):
        def set_layer(module, args):
            self.current = index

        return set_layer

    @contextlib.contextmanager
    def active(self):
        F.scaled_dot_product_attention = self
        torch.nn.functional.scaled_dot_product_attention = self
        try:
            yield self
        finally:
            F.scaled_dot_product_attention = self._original

    def __call__(
        self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        if attn_mask is not None and attn_mask.dtype == torch.bool and q.shape[-2] == k.shape[-2]:
            n = q.shape[-2]
            causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            shape = (*attn_mask.shape[:-2], n, n)
            if torch.equal(attn_mask.broadcast_to(shape), causal.expand(shape)):
                attn_mask, is_causal = None, True
        if self.capture is not None and attn_mask is None and is_causal:
            scale_used = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
            self.capture.append((self.current, q.detach(), k.detach(), v.detach(), scale_used))
        if self.current not in self.layers or attn_mask is not None or not is_causal:
            self.calls["exact"] += 1
            return self._original(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=scale, enable_gqa=enable_gqa,
            )  # fmt: skip
        self.calls["approximated"] += 1
        F.scaled_dot_product_attention = self._original  # the op's own exact calls stay exact
        try:
            return approximate(q, k, v, scale, self.params, self.impl)
        finally:
            F.scaled_dot_product_attention = self


@contextlib.contextmanager
def _hf_route(model, name: str, params: dict, rewritten: int, n_layers: int):
    """The configuration as an attn_implementation (the product's path); yields its report."""
    impl = f"hyperpass-quality-{name}"
    last = None if rewritten >= n_layers else rewritten
    hyperpass.register_hf(impl, last_n_layers=last, **{"min_len": 1, **params})
    report = hyperpass.integrations.hf.report(impl)
    report.reset()
    model.set_attn_implementation(impl)
    try:
        yield report
    finally:
        model.set_attn_implementation("sdpa")


def approximate(q, k, v, scale, params: dict, impl: str):
    """Causal attention of q [B, Hq, N, D] over k, v [B, Hkv, N, D] by one configuration."""
    cfg = DEFAULT.replace(**{"min_len": 1, **params})  # approximate at every length
    if impl == "reference":
        return hyper_attention_reference(q, k, v, is_causal=True, scale=scale, config=cfg)[0]
    return hyperpass.hyper_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1], config=cfg
    )


def approximate_with_lse(q, k, v, scale, params: dict):
    cfg = DEFAULT.replace(**{"min_len": 1, **params})  # approximate at every length
    return hyper_attention_reference(q, k, v, is_causal=True, scale=scale, config=cfg)


# ----------------------------------------------------------------------------- measurements
def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's head on hidden states, with its final soft-capping (Gemma) where it has one."""
    logits = model.lm_head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, chunk: int = 1024) -> float:
    """exp(mean next-token cross-entropy) over ids [N]; the head is applied in chunks."""
    hidden = model.model(input_ids=ids[None]).last_hidden_state[0]
    total = 0.0
    for start in range(0, ids.numel() - 1, chunk):
        stop = min(start + chunk, ids.numel() - 1)
        logits = _logits(model, hidden[start:stop])
        total += F.cross_entropy(logits, ids[start + 1 : stop + 1], reduction="sum").item()
    return math.exp(total / (ids.numel() - 1))


@torch.inference_mode()
def passkey_score(model, ids: torch.Tensor, answer_len: int) -> float:
    """Share of the answer's last ``answer_len`` tokens predicted right (teacher-forced argmax)."""
    logits = model(input_ids=ids[None], logits_to_keep=answer_len + 1).logits[0, :-1]
    return (logits.argmax(-1) == ids[-answer_len:]).float().mean().item()


@torch.inference_mode()
def passkey_generated(model, ids: torch.Tensor, answer_len: int) -> float:
    """Share of the answer's tokens that greedy decoding after the prompt writes."""
    prompt = ids[None, :-answer_len]
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                         max_new_tokens=answer_len, do_sample=False)  # fmt: skip
    return (out[0, prompt.shape[1] :] == ids[-answer_len:]).float().mean().item()


@torch.inference_mode()
def capture_qkv(model, router: Router, ids: torch.Tensor) -> list:
    """(layer, q, k, v, scale, exact out, exact lse) of each causal layer on ids [N]; exact in
    fp64."""
    router.layers, router.capture = set(), []
    model.model(input_ids=ids[None])
    captured, router.capture = router.capture, None
    with_exact = []
    for layer, q, k, v, scale in captured:
        group = q.shape[1] // k.shape[1]
        ke, ve = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
        out, lse = exact_attention(q.double() * scale, ke, ve, True)
        with_exact.append((layer, q, k, v, scale, out, lse))
    return with_exact


@torch.inference_mode()
def kernel_errors(captured: list, params: dict) -> dict:
    """Relative error (Frobenius) of out and lse vs exact over the captured layers."""
    out_err, lse_err = [], []
    for _, q, k, v, scale, ref_out, ref_lse in captured:
        out, lse = approximate_with_lse(q, k, v, scale, params)
        out_err.append(((out.double() - ref_out).norm() / ref_out.norm()).item())
        lse_err.append(((lse.double() - ref_lse).norm() / ref_lse.norm()).item())
    return {
        "out_rel_err": float(np.mean(out_err)),
        "out_rel_err_worst": float(np.max(out_err)),
        "lse_rel_err": float(np.mean(lse_err)),
        "lse_rel_err_worst": float(np.max(lse_err)),
    }


@torch.inference_mode()
def selected_keys_per_query(captured: list, params: dict) -> float | None:
    """Keys scored per query by ``method="select"`` on the captured layers: the keys at or
    before the query in the blocks the selection chose (what an adaptive budget spends on these
    inputs); ``None`` for other methods."""
    cfg = DEFAULT.replace(**{"min_len": 1, **params})  # approximate at every length
    if cfg.method != "select":
        return None
    counts = []
    for _, q, k, _v, scale, *_ in captured:
        n, qb, kb = q.shape[-2], cfg.query_block, cfg.select_block
        grouped = (q * scale).unflatten(1, (k.shape[1], q.shape[1] // k.shape[1]))
        blocks = select_block_mask(grouped, k, cfg, True, q.dtype)  # [B, Hkv, G, tiles, blocks]
        rows = torch.arange(blocks.shape[-2] * qb, device=q.device).view(-1, 1, qb)
        starts = torch.arange(blocks.shape[-1], device=q.device).view(1, -1, 1) * kb
        seen = ((rows + 1).clamp(max=n) - starts).clamp(0, kb) * (rows < n)  # keys <= each row
        per_pair = seen.sum(-1).float()  # [tiles, blocks]
        counts.append(((blocks.float() * per_pair).sum((-2, -1)) / n).mean().item())
    return float(np.mean(counts))


# ----------------------------------------------------------------------------- work
def keys_per_query(params: dict | None, n: int) -> float:
    """Average query-key scores computed per query of one causal layer of n tokens.

    Exact parts (window, sinks, exact diagonal blocks of the recursion) count the keys they keep;
    an LSH block and a sample set count in full (``block_size`` and ``sample_size``), masked keys
    included, since a kernel scores them whole. ``None`` is exact attention.
    """
    if params is None:
        return (n + 1) / 2
    cfg = DEFAULT.replace(**{"min_len": 1, **params})  # approximate at every length
    if cfg.method == "select":
        return _select_work(cfg, n)
    if cfg.method == "hyper" and cfg.causal_algo == "recursive":
        return _recursive_work(cfg, n, 0) / n
    q_pos = np.arange(n)
    return float(_exact_set_size(cfg, q_pos, 0, n, flat=True).mean() + _random_work(cfg, n))


def _select_work(cfg: HyperConfig, n: int) -> float:
    """``method="select"``, causal: the local blocks up to the query, the sink blocks outside
    them, and up to ``select_topk`` whole candidate blocks (the adaptive budget: its cap)."""
    q_pos = np.arange(n)
    kb = cfg.select_block
    start = (q_pos // cfg.query_block) * cfg.query_block
    lo = (np.maximum(start + cfg.query_block - cfg.window, 0) // kb) * kb
    local = q_pos - lo + 1
    sink_blocks = -(-cfg.sinks // kb)
    sinks = np.minimum(sink_blocks * kb, lo)
    candidates = np.maximum(lo // kb - sink_blocks, 0)
    selected = np.minimum(candidates, cfg.select_topk) * kb
    return float((local + sinks + selected).mean())


def _exact_set_size(cfg: HyperConfig, q_pos: np.ndarray, k_lo: int, k_hi: int, flat: bool):
    """Per query: pattern and sink keys in [k_lo, k_hi) (only the past), counted once."""
    window = max(cfg.window, 1) if flat else cfg.window
    lo = np.maximum(q_pos - window + 1, k_lo)
    hi = np.minimum(q_pos, k_hi - 1)  # inclusive
    # multiples of dilation in distance range [q - hi, q - lo]
    d_lo, d_hi = q_pos - hi, q_pos - lo
    pattern = np.where(
        (hi >= lo) & (window > 0),
        d_hi // cfg.dilation - (d_lo + cfg.dilation - 1) // cfg.dilation + 1,
        0,
    )
    sinks_hi = np.minimum(min(cfg.sinks, k_hi), q_pos + 1)
    sinks = np.maximum(sinks_hi - k_lo, 0)
    # sinks that the pattern already holds: sink positions p in [max(lo, k_lo), sinks_hi)
    both_lo = np.maximum(lo, k_lo)
    overlap = np.maximum(np.minimum(sinks_hi, hi + 1) - both_lo, 0)
    if cfg.dilation > 1 and overlap.any():  # rare (sinks inside a dilated window): count exactly
        overlap = np.array(
            [
                sum(1 for p in range(b, e) if (q - p) % cfg.dilation == 0)
                for q, b, e in zip(q_pos, both_lo, np.minimum(sinks_hi, hi + 1), strict=True)
            ]
        )
    return pattern + sinks - overlap


def _random_work(cfg: HyperConfig, nk: int) -> float:
    work = 0.0
    if cfg.uses_lsh:
        work += min(cfg.block_size, nk)
    if cfg.uses_samples:
        work += cfg.sample_size
    return work


def _recursive_work(cfg: HyperConfig, n: int, offset: int) -> float:
    """Total scores of the causal recursion on rows/cols [offset, offset + n)."""
    if n <= cfg.min_seq_len:
        return n * (n + 1) / 2
    half = n // 2
    q_pos = np.arange(offset + half, offset + n)
    lower_left = _exact_set_size(cfg, q_pos, offset, offset + half, flat=False).sum()
    lower_left += (n - half) * _random_work(cfg, half)
    return (
        _recursive_work(cfg, half, offset)
        + _recursive_work(cfg, n - half, offset + half)
        + lower_left
    )


# ----------------------------------------------------------------------------- driver
def prepare(args) -> None:
    tokenizer = quality_models.load_tokenizer(quality_models.gguf_path(args.model, args.model_path))
    prefix = [tokenizer.bos_token_id] if quality_models.MODELS[args.model].bos else []
    length = args.n_tokens - len(prefix)
    texts = {}
    for name, source in quality_texts.TEXTS.items():
        ids = tokenizer.encode(source(), add_special_tokens=False)
        if len(ids) < length:
            raise ValueError(f"text {name!r} has {len(ids)} tokens < {length}")
        texts[name] = torch.tensor(prefix + ids[:length], dtype=torch.long)
    passkeys = []
    for kind in args.haystack:
        haystack = None
        if kind == "prose":  # real text as the haystack; starts past the perplexity tokens
            haystack = tokenizer.encode(quality_texts.prose_text(), add_special_tokens=False)
            haystack = haystack[args.n_tokens :]
        passkeys += [
            (kind, quality_texts.passkey_prompt(
                tokenizer, depth, length, seed=args.seed + i, haystack=haystack
            ))
            for i, depth in enumerate(args.depths)
        ]  # fmt: skip
    payload = {
        "texts": texts,
        "passkeys": [
            {
                "ids": torch.tensor(prefix + p.ids),
                "answer_len": p.answer_len,
                "depth": p.depth,
                "key": p.key,
                "haystack": kind,
            }
            for kind, p in passkeys
        ],
        "model": args.model,
        "n_tokens": args.n_tokens,
    }
    Path(args.inputs).parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, args.inputs)
    print(
        f"wrote {args.inputs}: texts {list(texts)}, passkey lengths",
        [len(p.ids) for _, p in passkeys],
    )
    print(
        "answer tokens:",
        [tokenizer.convert_ids_to_tokens(p.ids[-p.answer_len :]) for _, p in passkeys[:1]],
    )


def _load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"meta": {}, "rows": {}}


def _save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    device = args.device
    inputs = torch.load(args.inputs)
    made_for = (inputs.get("model", "smollm2"), inputs.get("n_tokens", 8192))
    if made_for != (args.model, args.n_tokens):
        raise ValueError(
            f"--inputs {args.inputs} were prepared for {made_for[0]} at {made_for[1]} tokens, "
            f"not --model {args.model} at {args.n_tokens}"
        )
    out_path = Path(args.out)
    results = _load_results(out_path)
    dtype = quality_models.MODELS[args.model].cuda_dtype if device == "cuda" else torch.float32
    results["meta"].update(
        {
            "model": f"{quality_models.MODELS[args.model].title}, {str(dtype)[6:]}",
            "n_tokens": args.n_tokens,
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "impl": args.impl,
            "route": args.route,
            "passkey_mode": args.passkey_mode,
        }
    )
    t0 = time.time()
    path = quality_models.gguf_path(args.model, args.model_path)
    model = quality_models.load_model(path, args.model, device)
    print(f"model loaded in {time.time() - t0:.1f} s", flush=True)
    router = Router(model, impl=args.impl)
    n_layers = len(model.model.layers)
    texts = {name: ids.to(device) for name, ids in inputs["texts"].items()}
    passkeys = inputs["passkeys"]
    captured = None
    if args.kernel_level:
        with router.active():
            captured = capture_qkv(model, router, texts["code"])
        if args.asset:
            save_asset(captured, args.asset)

    for name in args.configs:
        if name in results["rows"] and not args.redo:
            print(f"{name}: done before, skipped", flush=True)
            continue
        entry = quality_configs.get(name)
        params, last = entry["params"], entry["last"]
        rewritten = n_layers if last is None else min(last, n_layers)
        router.layers = set() if params is None else set(range(n_layers - rewritten, n_layers))
        router.params = params or {}
        row = {
            "params": params,
            "layers": rewritten if params is not None else 0,
            "keys_per_query": keys_per_query(params, args.n_tokens),
        }
        t1 = time.time()
        routing = (
            _hf_route(model, name, params, rewritten, n_layers)
            if args.route == "hf" and params is not None
            else router.active()
        )
        with routing as report:
            for text, ids in texts.items() if not args.no_ppl else ():
                row[f"ppl_{text}"] = perplexity(model, ids)
                print(f"  {name}: perplexity on {text}: {row[f'ppl_{text}']:.3f} "
                      f"({time.time() - t1:.0f} s)", flush=True)  # fmt: skip
            by_haystack: dict[str, dict[str, float]] = {}
            for i, p in enumerate(passkeys if not args.no_passkey else ()):
                scores = by_haystack.setdefault(p.get("haystack", "filler"), {})
                score = passkey_generated if args.passkey_mode == "generate" else passkey_score
                scores[str(p["depth"])] = score(model, p["ids"].to(device), p["answer_len"])
                print(f"  {name}: passkey {i + 1}/{len(passkeys)} at depth {p['depth']}: "
                      f"{scores[str(p['depth'])]:.0%} ({time.time() - t1:.0f} s)",
                      flush=True)  # fmt: skip
            if by_haystack:
                first = next(iter(by_haystack))
                row["passkey"] = by_haystack[first]  # the first haystack's, as tables show it
                row["passkey_mean"] = float(np.mean(list(row["passkey"].values())))
                row["passkey_by_haystack"] = by_haystack
            if isinstance(report, hyperpass.integrations.patching.RoutingReport):
                totals = report.totals()
                row["calls_approximated"] = totals.approximated
                row["calls_exact"] = dict(totals.exact)
                # the layers approximated per forward (Gemma 3: its global layers only)
                forwards = (0 if args.no_ppl else len(texts)) + len(
                    passkeys if not args.no_passkey else ()
                )
                row["layers"] = totals.approximated // forwards
        if captured is not None and params is not None:
            row.update(kernel_errors(captured, params))
            measured = selected_keys_per_query(captured, params)
            if measured is not None:
                row["keys_per_query_measured"] = measured
        # work over the model's full-attention layers (Gemma 3's sliding ones are not counted)
        exact_work = keys_per_query(None, args.n_tokens)
        layer_work = row.get("keys_per_query_measured", row["keys_per_query"])
        full = _full_attention_layers(model)
        row["model_keys_per_query"] = (
            row["layers"] * layer_work + (full - row["layers"]) * exact_work
        ) / full
        row["work_ratio"] = exact_work / row["model_keys_per_query"]
        row["seconds"] = time.time() - t1
        results["rows"][name] = row
        _save(out_path, results)
        print(format_row(name, row), flush=True)


def _full_attention_layers(model) -> int:
    kinds = getattr(model.config, "layer_types", None)
    if kinds:
        return sum(kind == "full_attention" for kind in kinds)
    return len(model.model.layers)


def save_asset(captured: list, path: str) -> None:
    """A small test asset: one KV head and its first query heads of chosen layers, fp16."""
    layers, heads, n = (9, 20), 2, 4096
    asset = {}
    for layer, q, k, v, *_ in captured:
        if layer in layers:
            group = q.shape[1] // k.shape[1]
            asset[f"layer{layer}"] = {
                "q": q[:, :heads, :n].half().cpu().clone(),
                "k": k[:, :1, :n].half().cpu().clone(),
                "v": v[:, :1, :n].half().cpu().clone(),
                "group": group,
            }
    torch.save(asset, path)


# ----------------------------------------------------------------------------- report
def format_row(name: str, row: dict) -> str:
    def fmt(key, spec):
        return format(row[key], spec) if key in row else "-"

    by_haystack = row.get("passkey_by_haystack", {"filler": row.get("passkey", {})})
    passkeys = (
        " ".join(
            f"{kind}={np.mean(list(s.values())):.0%} [{' '.join(f'{v:.0%}' for v in s.values())}]"
            for kind, s in by_haystack.items()
            if s
        )
        or "-"
    )
    return (
        f"{name:34s} L={row['layers']:2d} keys/q={row['keys_per_query']:7.0f} "
        f"measured={fmt('keys_per_query_measured', '7.0f')} x{row['work_ratio']:4.2f} "
        f"ppl code={fmt('ppl_code', '.3f')} prose={fmt('ppl_prose', '.3f')} passkey {passkeys} "
        f"out_err={fmt('out_rel_err', '.3f')} lse_err={fmt('lse_rel_err', '.4f')}"
    )


def markdown_table(results: dict) -> str:
    """The measured rows as a Markdown table, sorted by work (exact first)."""
    rows = results["rows"]
    exact = rows.get("exact", {})
    head = (
        "| configuration | layers | keys/query (layer) | work vs exact | ppl code | ppl prose "
        "| passkey, filler | passkey, prose | out rel. err | lse rel. err |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    order = sorted(rows, key=lambda r: (r != "exact", -rows[r]["work_ratio"]))
    for name in order:
        row = rows[name]

        def ppl(text, row=row):
            value = row[f"ppl_{text}"]
            if f"ppl_{text}" not in exact or row is exact:
                return f"{value:.3f}"
            return f"{value:.3f} ({value / exact[f'ppl_{text}'] - 1:+.1%})"

        def passkey(kind, row=row):
            scores = row.get("passkey_by_haystack", {"filler": row.get("passkey")}).get(kind)
            if not scores:
                return "-"
            depths = " ".join(f"{v:.0%}" for v in scores.values())
            return f"{np.mean(list(scores.values())):.0%} ({depths})"

        err = (
            f"{row['out_rel_err']:.3f} | {row['lse_rel_err']:.4f}"
            if "out_rel_err" in row
            else "- | -"
        )
        keys = row.get("keys_per_query_measured", row["keys_per_query"])
        lines.append(
            f"| `{name}` | {row['layers']} | {keys:.0f} | "
            f"{1 / row['work_ratio']:.2f} | {ppl('code')} | {ppl('prose')} | "
            f"{passkey('filler')} | {passkey('prose')} | {err} |"
        )
    return head + "\n".join(lines) + "\n"


def report(args) -> None:
    results = _load_results(Path(args.out))
    for name, row in results["rows"].items():
        print(format_row(name, row))
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(results))
    if args.plot:
        plot(results, args.plot)


_LABELLED = (
    "local1024_s16", "local2048_s16", "rec2048_w1024_s16", "flat_w1024_s16_b256", "hyper_rec2048",
    "hyper_rec4096", "sel_w1024_k8_mean_gqa", "sel_w1024_k16", "sel_w512_k8_mean",
    "sel_w512_k16_q16",
)  # fmt: skip
_CAP = 20.0  # % above exact: rows beyond are drawn at the cap, marked with their value


def _family(name: str) -> tuple[str, str]:
    if name.startswith("select"):
        return "C0", "op: blocks selected by a score bound"
    if name.startswith(("local", "dilated")):
        return "C1", "op: fixed patterns (local, longformer, dilated)"
    return "C2", "op: HyperAttention (sortLSH, samples; flat or recursive)"


def plot(results: dict, path: str) -> None:
    """Perplexity increase vs work, all 30 layers rewritten; filled = passkey kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {n: r for n, r in results["rows"].items() if r["layers"] == 30}
    exact = results["rows"]["exact"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, text in zip(axes, ("code", "prose"), strict=True):
        seen = set()
        for name, row in rows.items():
            rise = 100 * (row[f"ppl_{text}"] / exact[f"ppl_{text}"] - 1)
            color, family = _family(name)
            kept = row["passkey_mean"] >= exact["passkey_mean"]
            ax.scatter(
                row["keys_per_query"], min(rise, _CAP), s=36, marker="o" if rise <= _CAP else "^",
                facecolors=color if kept else "none", edgecolors=color,
                label=None if family in seen else family,
            )  # fmt: skip
            seen.add(family)
            if name in _LABELLED or rise > _CAP:
                capped = rise > _CAP
                ax.annotate(
                    f"{name} (+{rise:.0f}%)" if capped else name,
                    (row["keys_per_query"], min(rise, _CAP)), fontsize=6 if capped else 7,
                    rotation=-60 if capped else 0, xytext=(3, -4 if capped else 3),
                    textcoords="offset points", va="top" if capped else "bottom",
                )  # fmt: skip
        ax.axhline(5, color="gray", ls="--", lw=0.8)
        ax.axvline(exact["keys_per_query"] / 2, color="gray", ls=":", lw=0.8)
        ax.set_ylim(-1, _CAP + 2)
        ax.set_xlabel("attention work: keys scored per query per layer (exact causal: 4096)")
        ax.set_ylabel(f"perplexity increase over exact, % ({text})")
        ax.set_title(
            f"SmolLM2-135M, {text}, 8192 tokens, 30 layers\n"
            "filled: passkey kept (5/5 depths); hollow: lost; dashed: +5%; dotted: 2x less work",
            fontsize=9,
        )
        ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("prepare", "run", "report", "list"))
    parser.add_argument("--inputs", default=".quality/inputs.pt")
    parser.add_argument("--out", default="benchmarks/results/quality.json")
    parser.add_argument("--model", choices=sorted(quality_models.MODELS), default="smollm2")
    parser.add_argument(
        "--model-path", default=None, help="the GGUF file (or its folder); default: the packages'"
    )
    parser.add_argument("--configs", type=lambda s: s.split(","), default=["exact"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--impl",
        choices=("op", "reference"),
        default="op",
        help="with --route router: the op or the reference directly",
    )
    parser.add_argument(
        "--route",
        choices=("hf", "router"),
        default="hf",
        help="hf: attn_implementation via register_hf (the product's path)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-tokens", type=int, default=None, help="default: the model's")
    parser.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=DEPTHS)
    parser.add_argument("--seed", type=int, default=0, help="first passkey's seed (prepare)")
    parser.add_argument(
        "--haystack",
        type=lambda s: s.split(","),
        default=["filler"],
        help="prepare: passkey haystacks, 'filler', 'prose' or 'filler,prose'",
    )
    parser.add_argument("--passkey-mode", choices=("teacher", "generate"), default="teacher",
                        help="teacher: the answer teacher-forced in the prefill; generate: "
                             "greedy decoding after the prompt")  # fmt: skip
    parser.add_argument("--no-ppl", action="store_true", help="run: passkeys only")
    parser.add_argument("--no-passkey", action="store_true", help="run: perplexity only")
    parser.add_argument("--kernel-level", action="store_true")
    parser.add_argument("--asset", default=None)
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    if args.n_tokens is None:
        args.n_tokens = quality_models.MODELS[args.model].n_tokens
    if args.command == "prepare":
        prepare(args)
    elif args.command == "run":
        run(args)
    elif args.command == "list":
        for name in quality_configs.names():
            entry = quality_configs.get(name)
            print(name, entry, f"{keys_per_query(entry['params'], args.n_tokens):.0f}")
    else:
        report(args)


if __name__ == "__main__":
    main()
