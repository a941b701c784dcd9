"""Llama family on tvm.relax.frontend.nn: Llama 2/3 (llama3 rope scaling), SmolLM2, TinyLlama; GQA; tied embeddings.

Qwen2 is this file with q/k/v bias (models/qwen2.py sets it). Attention runs on TVM's paged KV cache, which applies
RoPE inside `attention_with_fused_qkv`. Shapes in comments: b batch, s tokens, h/kv heads, d head_dim.
"""

from __future__ import annotations

from .._tvm import compiler
from ..config import ModelConfig
from ..kernels import KernelRegistry
from ..kernels.kv_cache import paged_kv_cache
from ..quant.nn import Embedding, Linear, _weights
from ..quant.schemes import PrecisionPlan, QuantScheme

c = compiler()
nn, te, tirx, rx = c.nn, c.te, c.tirx, c.relax


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, scheme: QuantScheme, dtype: str, kernels: KernelRegistry):
        self.h, self.kv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.h + 2 * self.kv) * self.d, scheme, dtype, kernels,
                               bias=cfg.attention_bias)
        self.o_proj = Linear(self.h * self.d, cfg.hidden_size, scheme, dtype, kernels)

    def forward(self, x, cache, layer_id: int):
        return self.o_proj(self.attention(self.qkv_proj(x), cache, layer_id))

    def attention(self, qkv, cache, layer_id: int):
        """qkv_proj's output [b, s, (h+2kv) d] -> the attention output [b, s, h d] (o_proj's input)."""
        b, s, _ = qkv.shape
        qkv = qkv.reshape(b, s, self.h + 2 * self.kv, self.d)  # [b, s, h+2kv, d]
        out = cache.attention_with_fused_qkv(layer_id, qkv, self.h, sm_scale=self.d**-0.5)  # [b, s, h, d]
        return out.reshape(b, s, self.h * self.d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, scheme: QuantScheme, dtype: str, kernels: KernelRegistry):
        self.inter, self.kernels = cfg.intermediate_size, kernels
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * self.inter, scheme, dtype, kernels)
        self.down_proj = Linear(self.inter, cfg.hidden_size, scheme, dtype, kernels)

    def forward(self, x):
        return self.down_proj(_silu_mul(self.gate_up_proj(x), self.inter, self.kernels))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, scheme: QuantScheme, dtype: str, kernels: KernelRegistry):
        self.kernels = kernels
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)
        self.self_attn = Attention(cfg, scheme, dtype, kernels)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)
        self.mlp = MLP(cfg, scheme, dtype, kernels)

    def forward(self, x, h, cache, layer_id: int):
        """x: residual stream, h = input_layernorm(x) -> (x + attention, MLP output); the caller adds the MLP
        output together with the next norm (one kernel on CPU)."""
        x, h = _add_rms_norm(x, self.self_attn(h, cache, layer_id), self.post_attention_layernorm, self.kernels)
        return x, self.mlp(h)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: PrecisionPlan, dtype: str, kernels: KernelRegistry):
        self.kernels = kernels
        scheme = plan.layers
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, plan.embedding, dtype, kernels)
        self.layers = nn.ModuleList([DecoderLayer(cfg, scheme, dtype, kernels) for _ in range(cfg.num_hidden_layers)])
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)

    def forward(self, ids, cache):
        """ids [b, s] -> the final norm's output [b, s, hidden]."""
        b, s = ids.shape
        x = self.embed_tokens(ids.reshape(b * s)).reshape(b, s, -1)  # [b, s, hidden]
        if isinstance(b, int) and isinstance(s, int) and b * s == 1 and self.kernels.decode_fusion != "off":
            # one-token decode with the fused GEMVs (CUDA)
            return self._decode(x, cache)
        h = self.layers[0].input_layernorm(x)
        for i, layer in enumerate(self.layers):
            x, mlp_out = layer(x, h, cache, i)
            norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            x, h = _add_rms_norm(x, mlp_out, norm, self.kernels)
        return h

    def _decode(self, x, cache):
        """The layers of a one-token step, the residual add + RMSNorm handed to the next GEMV (qkv, gate_up) and
        silu(gate) * up to gate_up's epilogue where the registry has the fused kernels (`fused_gemv`, CUDA); the
        first layer's norm (no add before it) staged by its qkv GEMV the same way. The same function as `forward`'s
        loop, kernel for kernel where the registry has none. The final norm stays a kernel of its own: staged by the
        8B's 4-bit head GEMV it cost more than it saved (H200, docs/benchmarks/h200-pdl.md run 26: the head 72.7 ->
        95.6 us, tg128 603.0 -> 601.6 tok/s)."""
        qkv = _first_norm_linear(x, self.layers[0].input_layernorm, self.layers[0].self_attn.qkv_proj, self.kernels)
        for i, layer in enumerate(self.layers):
            mlp, attn = layer.mlp, layer.self_attn
            norm = layer.post_attention_layernorm
            chain = self.kernels.dp4a_mlp(mlp.gate_up_proj.in_features, mlp.inter, mlp.gate_up_proj.scheme, x.dtype,
                                          norm.epsilon)
            if chain is not None and mlp.down_proj.scheme == mlp.gate_up_proj.scheme:
                x, y = _mlp_int8(x, attn.o_proj(attn.attention(qkv, cache, i)), norm, mlp, chain)
                if i + 1 < len(self.layers):
                    nxt = self.layers[i + 1]
                    x, qkv = _norm_linear(x, y, nxt.input_layernorm, nxt.self_attn.qkv_proj, self.kernels)
                else:
                    x, h = _add_rms_norm(x, y, self.norm, self.kernels)
                continue
            x, act = _res_norm_linear(x, attn.attention(qkv, cache, i), attn.o_proj, norm, mlp.gate_up_proj,
                                      self.kernels, silu_inter=mlp.inter)
            if i + 1 < len(self.layers):
                nxt = self.layers[i + 1]
                x, qkv = _res_norm_linear(x, act, mlp.down_proj, nxt.input_layernorm, nxt.self_attn.qkv_proj,
                                          self.kernels)
            else:
                x, h = _add_rms_norm(x, mlp.down_proj(act), self.norm, self.kernels)
        return h


def _mlp_int8(x, o, norm, mlp, chain):
    """(x + o, down(silu(gate) * up of norm(x + o))) for one token with the registry's int8-activation chain
    (`dp4a_mlp`): the norm kernel quantizes its output, gate_up + silu takes it and quantizes its own, down takes
    that (uint32 [n / 8, 4]: per packed word of 8 activations the int8 pairs, d and sum(q))."""
    b, s, hidden = x.shape
    norm_q8, gate_up, down = chain
    ph = nn.Tensor.placeholder
    x, hq = nn.op.tensor_ir_op(norm_q8, "add_rms_norm_q8", [x.reshape(1, hidden), o.reshape(1, hidden), norm.weight],
                               [ph((1, hidden), x.dtype), ph((hidden // 8, 4), "uint32")])
    aq = nn.op.tensor_ir_op(gate_up, "linear_gemv_silu_q8", [hq, *_weights(mlp.gate_up_proj, mlp.gate_up_proj.scheme)],
                            ph((mlp.inter // 8, 4), "uint32"))
    y = nn.op.tensor_ir_op(down, "linear_gemv_q8", [aq, *_weights(mlp.down_proj, mlp.down_proj.scheme)],
                           ph((1, hidden), x.dtype))
    return x.reshape(b, s, hidden), y.reshape(b, s, hidden)


def _first_norm_linear(x, norm, linear: Linear, kernels: KernelRegistry):
    """linear(norm(x)) for one token [1, 1, hidden] (the first layer's qkv: no residual add before its norm): one
    GEMV staging the norm of x (`fused_gemv(add=False)`, add_rms_norm_gpu's arithmetic) where the registry has it,
    else the norm and the linear."""
    b, s, hidden = x.shape
    lin, weights, out_f = _gemv_operands(linear, x.dtype, None)
    func = kernels.fused_gemv(*lin, norm_eps=norm.epsilon, silu=False, add=False)
    if func is None or linear.scheme.act_order:
        return linear(norm(x))
    out = nn.op.tensor_ir_op(func, "linear_gemv_norm", [x.reshape(1, hidden), norm.weight, *weights],
                             nn.Tensor.placeholder((1, out_f), x.dtype))
    return out.reshape(b, s, out_f)


def _add_rms_norm(x, y, norm, kernels: KernelRegistry):
    """(x + y, norm(x + y)) for [b, s, hidden]: one kernel where the registry has one (CPU, CUDA), else two ops."""
    b, s, hidden = x.shape
    func = kernels.add_rms_norm(hidden, norm.epsilon, x.dtype)
    if func is None:
        x = x + y
        return x, norm(x)
    out = [nn.Tensor.placeholder((b * s, hidden), x.dtype) for _ in range(2)]
    x, h = nn.op.tensor_ir_op(func, "add_rms_norm", [x.reshape(b * s, hidden), y.reshape(b * s, hidden), norm.weight],
                              out)
    return x.reshape(b, s, hidden), h.reshape(b, s, hidden)


def _res_norm_linear(x, a, producer: Linear, norm, linear: Linear, kernels: KernelRegistry,
                     silu_inter: int | None = None):
    """(x + producer(a), linear(norm(x + producer(a)))) for one token (then silu(gate) * up when `silu_inter`): the
    producer (o / down) adds its output to the residual itself and `linear` normalizes without an add where the
    registry has both kernels (`residual_gemv`, `fused_gemv(add=False)`), else `_norm_linear`."""
    b, s, hidden = x.shape
    lin, weights, out_f = _gemv_operands(linear, x.dtype, silu_inter)
    res = kernels.residual_gemv(producer.in_features, producer.out_features, producer.scheme, x.dtype)
    func = (kernels.fused_gemv(*lin, norm_eps=norm.epsilon, silu=silu_inter is not None, add=False)
            if res is not None and producer.bias is None and not producer.scheme.act_order else None)
    if func is None:
        return _norm_linear(x, producer(a), norm, linear, kernels, silu_inter)
    x = nn.op.tensor_ir_op(res, "linear_gemv_res", [a.reshape(1, producer.in_features),
                                                    *_weights(producer, producer.scheme), x.reshape(1, hidden)],
                           nn.Tensor.placeholder((1, hidden), x.dtype))
    out = nn.op.tensor_ir_op(func, "linear_gemv_norm", [x, norm.weight, *weights],
                             nn.Tensor.placeholder((1, out_f), x.dtype))
    return x.reshape(b, s, hidden), out.reshape(b, s, out_f)


def _gemv_operands(linear: Linear, dtype: str, silu_inter: int | None):
    """(the registry's key of `linear`: in, out, scheme, dtype, has bias; its weight tensors and bias in argument
    order; the fused GEMV's output width: `silu_inter` with the silu epilogue, else `out`)."""
    lin = (linear.in_features, linear.out_features, linear.scheme, dtype, linear.bias is not None)
    weights = _weights(linear, linear.scheme) + ([linear.bias] if linear.bias is not None else [])
    return lin, weights, silu_inter if silu_inter is not None else linear.out_features


def _norm_linear(x, y, norm, linear: Linear, kernels: KernelRegistry, silu_inter: int | None = None):
    """(x + y, linear(norm(x + y))) for one token [1, 1, hidden], then silu(gate) * up of the result when
    `silu_inter` (the gate_up linear): one fused GEMV where the registry has it (`fused_gemv`), else the separate
    kernels (the silu epilogue alone where only that is fused)."""
    b, s, hidden = x.shape
    silu = silu_inter is not None
    lin, weights, out_f = _gemv_operands(linear, x.dtype, silu_inter)
    func = kernels.fused_gemv(*lin, norm_eps=norm.epsilon, silu=silu)
    if func is not None:
        out, x = nn.op.tensor_ir_op(func, "linear_gemv_norm", [x.reshape(1, hidden), y.reshape(1, hidden),
                                                               norm.weight, *weights],
                                    [nn.Tensor.placeholder((1, out_f), x.dtype),
                                     nn.Tensor.placeholder((1, hidden), x.dtype)])
        return x.reshape(b, s, hidden), out.reshape(b, s, out_f)
    x, h = _add_rms_norm(x, y, norm, kernels)
    func = kernels.fused_gemv(*lin, norm_eps=None, silu=True) if silu else None
    if func is not None:
        out = nn.op.tensor_ir_op(func, "linear_gemv_silu", [h.reshape(1, hidden), *weights],
                                 nn.Tensor.placeholder((1, out_f), x.dtype))
        return x, out.reshape(b, s, out_f)
    out = linear(h)
    return x, (_silu_mul(out, silu_inter, kernels) if silu else out)


def _silu_mul(gate_up, inter: int, kernels: KernelRegistry):
    """[b, s, 2 inter] -> silu(gate) * up [b, s, inter].

    On CUDA the registry's kernel (16-byte vectors); on CPU one tensor expression with a vectorizable exp (LLVM's
    exp is a libm call per element there); elsewhere two Relax ops.
    """
    func = kernels.silu_mul(inter, gate_up.dtype)
    if func is not None:
        b, s, _ = gate_up.shape
        out = nn.op.tensor_ir_op(func, "silu_mul", [gate_up.reshape(b * s, 2 * inter)],
                                 nn.Tensor.placeholder((b * s, inter), gate_up.dtype))
        return out.reshape(b, s, inter)
    silu = kernels.cpu_silu
    if silu is None:
        gate, up = nn.op.split(gate_up, 2, axis=-1)  # [b, s, inter] each
        return nn.op.silu(gate) * up

    def f(x):
        b, s, _ = x.shape
        return te.compute((b, s, inter), lambda i, j, k: (silu(x[i, j, k].astype("float32"))
                                                          * x[i, j, inter + k].astype("float32")).astype(x.dtype),
                          name="silu_mul")

    return nn.op.tensor_expr_op(f, "silu_mul", [gate_up])


def _last_token(x):
    """[b, s, d] -> [b, 1, d]: the hidden state the next token is read from."""

    def f(x_te):
        b, s, d = x_te.shape
        return te.compute((b, 1, d), lambda i, _, k: x_te[i, s - 1, k], name="last_token")

    return nn.op.tensor_expr_op(f, "last_token", [x])


class LlamaForCausalLM(nn.Module):
    # edgellm float names of the tensor classes with a precision of their own (PrecisionPlan)
    EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"

    def __init__(self, cfg: ModelConfig, scheme: QuantScheme, kernels: KernelRegistry,
                 plan: PrecisionPlan | None = None):
        """`kernels`: the registry for the build's target and options; the model asks it for every kernel.
        `plan`: the embedding's and head's rows beside the layers' `scheme` (default: `scheme` everywhere)."""
        plan = plan or PrecisionPlan.uniform(scheme)
        self.cfg, self.scheme, self.dtype, self.kernels = cfg, scheme, scheme.act_dtype, kernels
        self.model = Backbone(cfg, plan, self.dtype, kernels)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, plan.head, self.dtype, kernels))
        from ..kernels import owned_kv

        opt = kernels.options.cuda_kv
        self.owned = (opt == "owned" and owned_kv.supports(kernels, cfg, self.dtype)) or (
            opt == "auto" and owned_kv.auto_owned(kernels, cfg, self.dtype))
        if opt == "owned" and not self.owned:
            raise ValueError(f"--opt cuda_kv=owned needs CUDA sm_80+, fp16, head_dim 64 or 128 and no rope scaling but "
                             f"llama3/linear (target {kernels.kind}, dtype {self.dtype}, head_dim {cfg.head_dim}); "
                             "leave cuda_kv at auto")

    def _head(self, x):
        return self.model.embed_tokens.as_linear(x) if self.lm_head is None else self.lm_head(x)

    def _logits(self, x):
        logits = self._head(x)
        return logits.astype("float32") if logits.dtype != "float32" else logits

    # The entry points take either TVM's PagedKVCache (`cache`) or, with the owned cache (`self.owned`), its
    # tensors: pages, page_table, pos0 (kernels/owned_kv.py). The owned functions return the logits alone.
    def _cache(self, cache, page_table, pos0, decode: bool):
        if not self.owned:
            return cache
        from ..kernels.owned_kv import OwnedKVCache

        return OwnedKVCache(self.kernels, self.cfg, self.dtype, cache, page_table, pos0, decode)

    def _out(self, logits, cache):
        return logits if self.owned else (logits, cache)

    def prefill(self, ids, cache, page_table=None, pos0=None):
        """ids [1, s] -> logits of the last token [1, 1, vocab]; appends s tokens to the cache."""
        kv = self._cache(cache, page_table, pos0, False)
        return self._out(self._logits(_last_token(self.model(ids, kv))), cache)

    def prefill_logits(self, ids, cache, page_table=None, pos0=None):
        """ids [1, s] -> logits of every position [1, s, vocab] (scoring, teacher forcing)."""
        kv = self._cache(cache, page_table, pos0, False)
        return self._out(self._logits(self.model(ids, kv)), cache)

    def decode(self, ids, cache, page_table=None, pos0=None):
        """ids [1, 1] -> [1, 1, vocab]: static shapes so the GEMV kernels apply."""
        kv = self._cache(cache, page_table, pos0, True)
        return self._out(self._logits(self.model(ids, kv)), cache)

    def batch_decode(self, ids, cache, page_table=None, pos0=None):
        """ids [b, 1] (one new token for each of b sequences) -> [b, 1, vocab]; batched serving."""
        kv = self._cache(cache, page_table, pos0, True)
        return self._out(self._logits(self.model(ids, kv)), cache)

    def decode_greedy(self, ids, cache, page_table, pos0, sink):
        """The owned cache's greedy decode step (CUDA): ids [1, 1] -> the most likely next token [1, 1] int32, and
        the next step's inputs advanced on the device: the token into `ids` (returned) and pos0 one further, in place,
        and the token into the mapped host buffer at `sink` [1] int64 (kernels/cuda_math.greedy_advance_gpu). A
        greedy chain (device_runners/engine.py) replays this step's graph with no copy between steps."""
        kv = self._cache(cache, page_table, pos0, True)
        logits = self._head(self.model(ids, kv))  # [1, 1, vocab] in the activation dtype: no cast kernel
        partial, advance, parts = self.kernels.greedy_step(self.cfg.vocab_size, logits.dtype)
        ph = nn.Tensor.placeholder
        pv, pi = nn.op.tensor_ir_op(partial, "argmax_partial", [logits],
                                    [ph((1, parts), "float32"), ph((1, parts), "int32")])
        token, _ = nn.op.tensor_ir_inplace_op(advance, "greedy_advance", [pv, pi, ids, kv.pos0, sink], [2, 3],
                                              [ph((1, 1), "int32"), ph((1,), "int32")])
        # `ids` handed back through the VM's identity builtin, which RewriteCUDAGraph leaves outside the graph:
        # returned as it is (or as a view), the rewrite (TVM 0.27) captures it and leaves the function's return
        # value undefined; a reshape is a copy kernel after the graph
        return nn.wrap_nested(rx.op.call_pure_packed("vm.builtin.copy", token._expr,
                                                     ty_args=[rx.TensorType((1, 1), "int32")]), name="token")

    def argmax(self, logits):
        """logits [b, 1, vocab] -> greedy token ids [b, 1] int32, on the device (CUDA builds export it: a greedy step
        then copies 4 bytes back instead of the logits)."""
        b, vocab = logits.shape[0], self.cfg.vocab_size
        partial, final, parts = self.kernels.argmax(vocab)
        pv, pi = nn.op.tensor_ir_op(partial, "argmax_partial", [logits],
                                    [nn.Tensor.placeholder((b, parts), "float32"),
                                     nn.Tensor.placeholder((b, parts), "int32")])
        return nn.op.tensor_ir_op(final, "argmax_final", [pv, pi], nn.Tensor.placeholder((b, 1), "int32"))

    def create_tir_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                                  support_sliding_window):
        cfg = self.cfg
        return paged_kv_cache(  # TVM's TIRPagedKVCache, with the registry's attention and RoPE kernels
            self.kernels,
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, cfg.num_hidden_layers]),
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            qk_head_dim=cfg.head_dim,
            v_head_dim=cfg.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=c.RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=cfg.rope_theta,
            rope_scaling=cfg.rope_scaling or {},
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=cfg.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
        )

    def export_spec(self) -> dict:
        fwd = {"param_mode": "packed", "effect_mode": "none"}
        argmax = ({"argmax": {"logits": nn.spec.Tensor(["batch_size", 1, self.cfg.vocab_size], "float32"),
                              "$": {"param_mode": "none", "effect_mode": "none"}}}
                  if self.kernels.argmax(self.cfg.vocab_size) is not None else {})
        if self.owned:  # the cache's tensors are inputs (kernels/owned_kv.py)
            cfg = self.cfg
            pages = nn.spec.Tensor([cfg.num_hidden_layers, "num_pages", 2, cfg.num_key_value_heads, 16, cfg.head_dim],
                                   self.dtype)

            def state(b):
                return {"cache": pages, "page_table": nn.spec.Tensor([b, "max_pages"], "int32"),
                        "pos0": nn.spec.Tensor([b], "int32")}

            return {
                "prefill": {"ids": nn.spec.Tensor([1, "seq_len"], "int32"), **state(1), "$": fwd},
                "prefill_logits": {"ids": nn.spec.Tensor([1, "seq_len"], "int32"), **state(1), "$": fwd},
                "decode": {"ids": nn.spec.Tensor([1, 1], "int32"), **state(1), "$": fwd},
                "batch_decode": {"ids": nn.spec.Tensor(["batch_size", 1], "int32"), **state("batch_size"), "$": fwd},
                **argmax,
                **({"decode_greedy": {"ids": nn.spec.Tensor([1, 1], "int32"), **state(1),
                                      "sink": nn.spec.Tensor([1], "int64"), "$": fwd}}
                   if self.kernels.greedy_step(self.cfg.vocab_size, self.dtype) is not None else {}),
            }
        cache = nn.spec.Object(object_type=c.PagedKVCache)
        return {
            "prefill": {"ids": nn.spec.Tensor([1, "seq_len"], "int32"), "cache": cache, "$": fwd},
            "prefill_logits": {"ids": nn.spec.Tensor([1, "seq_len"], "int32"), "cache": cache, "$": fwd},
            "decode": {"ids": nn.spec.Tensor([1, 1], "int32"), "cache": cache, "$": fwd},
            "batch_decode": {"ids": nn.spec.Tensor(["batch_size", 1], "int32"), "cache": cache, "$": fwd},
            **argmax,
            "create_tir_paged_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int, "page_size": int,
                "support_sliding_window": int, "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }


def source_map(cfg: ModelConfig) -> tuple[dict[str, list[str]], list[str]]:
    """edgellm float parameter -> the HF tensors concatenated (axis 0) to make it; plus HF names to ignore.

    Quantized schemes store `X.weight` as `X.q_weight` + `X.q_scale`; the quantizer derives those names.
    """
    m: dict[str, list[str]] = {
        "model.embed_tokens.weight": ["model.embed_tokens.weight"],
        "model.norm.weight": ["model.norm.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        m[f"{p}.input_layernorm.weight"] = [f"{p}.input_layernorm.weight"]
        m[f"{p}.post_attention_layernorm.weight"] = [f"{p}.post_attention_layernorm.weight"]
        m[f"{p}.self_attn.qkv_proj.weight"] = [f"{p}.self_attn.{x}_proj.weight" for x in "qkv"]
        if cfg.attention_bias:
            m[f"{p}.self_attn.qkv_proj.bias"] = [f"{p}.self_attn.{x}_proj.bias" for x in "qkv"]
        m[f"{p}.self_attn.o_proj.weight"] = [f"{p}.self_attn.o_proj.weight"]
        m[f"{p}.mlp.gate_up_proj.weight"] = [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"]
        m[f"{p}.mlp.down_proj.weight"] = [f"{p}.mlp.down_proj.weight"]
    unused = [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(cfg.num_hidden_layers)]
    if cfg.tie_word_embeddings:
        unused.append("lm_head.weight")  # some tied checkpoints still store a copy
    else:
        m["lm_head.weight"] = ["lm_head.weight"]
    return m, unused
