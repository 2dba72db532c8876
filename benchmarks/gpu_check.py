"""GPU check: the real workload's shape (an 8B policy and an 8B reward model) on one GPU.

Builds a Llama-3-8B-shaped ``LlamaForCausalLM`` and an 8B-shaped ``LlamaForSequenceClassification``
with random weights directly on the device in bfloat16 (meta-device init, then ``to_empty``: no
CPU copy of the weights), and a word-level tokenizer of Llama 3's vocabulary size built in code
(with Llama 3's chat template). Steps are fixed-size (``step=max_tokens``), so random text does
not matter. Nothing is downloaded; mahalo is imported from the working tree.

It measures and prints (and writes to ``--out DIR/gpu_check.json``):

1. the memory bandwidth of a device-to-device copy, and from it the weight-read floor of one
   policy decode step (policy weight bytes / bandwidth);
2. ms per policy decode step (the engine's packed forward of one token per row, rows reading a
   shared cached prompt, and the head) at 5, 40 and 160 rows against that floor (target: <= 2x
   at 160 rows), eager and with ``engine.compile`` (``torch.compile`` of the backbone);
3. prompts per minute of ``step_best_of_n`` (N=5) through ``guided_generate_many`` at
   ``max_prompts`` 1, 8, 32 and 64 (target: 32 >= 15x 1), with the token-level engine and with
   the lockstep ablation (``step_barrier=True, share_prefix=False``);
4. the paper's loop (``reference_decoder.py``): s/token and prompts per minute (target: mahalo
   at 32 >= 20x it);
5. peak GPU memory.

``--shape tiny`` runs the same code on a tiny shape on the CPU (for checking the script).

    bash benchmarks/gpu_check.sh                      # on the GPU machine: --out $OUT
    python benchmarks/gpu_check.py --shape tiny --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,  # noqa: E402
)

from benchmarks.reference_decoder import reference_decode  # noqa: E402
from benchmarks.step_cost import time_step  # noqa: E402
from mahalo import guided_generate_many  # noqa: E402
from mahalo.app.tiny import LLAMA3  # noqa: E402
from mahalo.policy import HFPolicy  # noqa: E402
from mahalo.rewards import SequenceClassifierReward  # noqa: E402

SHAPES = {  # Llama-3-8B: 4096 hidden, 32 layers, 32 heads / 8 KV heads, 14336 MLP, 128256 tokens
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|finetune_right_pad_id|>"]


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ``vocab_size`` tokens (``w0`` ... and Llama 3's specials)."""
    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS) - 1)]
    vocab = {tok: i for i, tok in enumerate(["<unk>", *words, *SPECIALS])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>", unk_token="<unk>")
    tok.chat_template = LLAMA3
    return tok


def build_model(cls: type, shape: dict[str, int], tok: Any, device: torch.device, dtype: torch.dtype, seed: int,
                **extra: Any) -> Any:
    """A random model built on the meta device, materialised on ``device`` in ``dtype``."""
    config = LlamaConfig(**shape, max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, attn_implementation="sdpa",
                         **extra)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created (on meta) and allocated in dtype
    try:
        with torch.device("meta"):
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # rotary frequencies are buffers computed at construction: rebuild them on the device
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, mb: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), median of 5."""
    n = mb * 2**20 // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    del src, dst
    return 2 * n * 2 / statistics.median(times[1:])


def decode_step_ms(policy: HFPolicy, prompt: list[int], rows: int, steps: int, device: torch.device) -> float:
    """Median ms of one decode step (one token per row) with ``rows`` rows on a shared prompt
    (:func:`benchmarks.step_cost.time_step`; its timing reads the logits, which syncs the GPU)."""
    sync(device)
    return time_step(policy, prompt, rows, steps, repeats=3)


def prompt_text(i: int, words: int, vocab: int) -> str:
    gen = torch.Generator().manual_seed(1000 + i)
    return " ".join(f"w{int(w)}" for w in torch.randint(0, vocab - 16, (words,), generator=gen))


ENGINES = {"token-level": {}, "lockstep ablation": {"step_barrier": True, "share_prefix": False}}


def prompts_per_minute(policy: HFPolicy, truth: Any, prompts: list[str], max_prompts: int, args: argparse.Namespace,
                       engine: str) -> dict[str, Any]:
    opts = dict(strategy="step_best_of_n", num_candidates=5, max_new_tokens=args.max_new_tokens, step="max_tokens",
                min_step_tokens=0, max_step_tokens=args.step_tokens, seed=0, max_prompts=max_prompts,
                max_rows=max(5 * max_prompts, 5), **ENGINES[engine])
    sync(policy.device)
    t = time.perf_counter()
    results = dict(guided_generate_many(policy, {"truth": truth}, prompts, **opts))
    sync(policy.device)
    wall = time.perf_counter() - t
    tokens = sum(r.stats.response_tokens for r in results.values())
    return {"engine": engine, "max_prompts": max_prompts, "prompts": len(prompts), "wall_s": wall,
            "prompts_per_min": 60 * len(prompts) / wall, "response_tokens_per_s": tokens / wall,
            "answers": {i: r.token_ids for i, r in results.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="GPU check: 8B-shaped policy and reward model on one GPU")
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--device", default=None, help="default: cuda for 8b, cpu for tiny")
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    p.add_argument("--rows", default="5,40,160")
    p.add_argument("--max-prompts", default="1,8,32,64")
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--step-tokens", type=int, default=16)
    p.add_argument("--reference-tokens", type=int, default=32)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled decode step")
    args = p.parse_args(argv)
    tiny = args.shape == "tiny"
    device = torch.device(args.device or ("cpu" if tiny else "cuda"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shape = SHAPES[args.shape]
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "shape": args.shape, "device": str(device), "dtype": str(dtype),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "transformers": transformers.__version__, "commit": _commit(),
    }
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tok = build_tokenizer(shape["vocab_size"])
    policy_model = build_model(LlamaForCausalLM, shape, tok, device, dtype, seed=0)
    rm_model = build_model(LlamaForSequenceClassification, shape, tok, device, dtype, seed=1, num_labels=1)
    policy = HFPolicy(policy_model, tok)
    truth = SequenceClassifierReward(rm_model, tok)
    weight_bytes = sum(p.numel() * p.element_size() for p in policy_model.parameters())
    out["build_s"] = time.perf_counter() - t0
    out["policy_weight_gb"] = weight_bytes / 1e9
    _say(f"built two {args.shape} models on {device} in {out['build_s']:.1f} s; policy weights {weight_bytes / 1e9:.2f} GB")

    # 1-2. bandwidth, roofline, decode step vs rows
    bw = copy_bandwidth(device, 64 if tiny else 4096)
    roofline_ms = 1000 * weight_bytes / bw
    out.update(copy_bandwidth_gb_s=bw / 1e9, roofline_ms=roofline_ms)
    _say(f"copy bandwidth {bw / 1e9:.0f} GB/s -> weight-read floor {roofline_ms:.2f} ms per decode step")
    prompt = policy.prompt_ids([{"role": "user", "content": prompt_text(0, args.prompt_words, shape["vocab_size"])}])
    out["decode_step"] = []
    compiled = None if args.no_compile else HFPolicy(policy_model, tok)
    if compiled is not None:
        compiled.compile()
    for rows in [int(r) for r in args.rows.split(",")]:
        ms = decode_step_ms(policy, prompt, rows, steps=5 if tiny else 20, device=device)
        row = {"rows": rows, "ms": ms, "x_roofline": ms / roofline_ms}
        if compiled is not None:
            t = time.perf_counter()
            row["compiled_ms"] = decode_step_ms(compiled, prompt, rows, steps=5 if tiny else 20, device=device)
            row["compile_and_time_s"] = time.perf_counter() - t
        out["decode_step"].append(row)
        _say(f"decode step at {rows:4d} rows: {ms:8.2f} ms = {ms / roofline_ms:.2f}x the weight-read floor"
             + (f"; compiled {row['compiled_ms']:.2f} ms" if compiled is not None else ""))

    # 3. prompts per minute at max_prompts, both engines (the same answers)
    out["throughput"] = []
    for mp in [int(m) for m in args.max_prompts.split(",")]:
        count = max(2 * mp, 8) if not tiny else max(mp, 2)
        prompts = [prompt_text(i, args.prompt_words, shape["vocab_size"]) for i in range(count)]
        rows = [prompts_per_minute(policy, truth, prompts, mp, args, engine) for engine in ENGINES]
        same = rows[0].pop("answers") == rows[1].pop("answers")
        for row in rows:
            row["same_answers"] = same
            out["throughput"].append(row)
            _say(f"{row['engine']:>17} max_prompts={mp:3d}: {row['prompts']} prompts in {row['wall_s']:.1f} s = "
                 f"{row['prompts_per_min']:.1f} prompts/min, {row['response_tokens_per_s']:.0f} response tokens/s"
                 f" (same answers: {same})")

    # 4. the paper's loop
    t = time.perf_counter()
    ref = reference_decode(policy_model, tok, rm_model, tok, prompt_text(0, args.prompt_words, shape["vocab_size"]),
                           num_candidates=5, max_new_tokens=args.reference_tokens, seed=0,
                           min_step_tokens=args.step_tokens, max_step_tokens=args.step_tokens)
    sync(device)
    ref_wall = time.perf_counter() - t
    n_ref = max(len(ref.token_ids), 1)
    ref_ppm = 60 / (ref_wall * args.max_new_tokens / n_ref)  # its rate at the same response length
    out["reference"] = {"wall_s": ref_wall, "response_tokens": len(ref.token_ids), "s_per_token": ref_wall / n_ref,
                        "prompts_per_min_at_max_new_tokens": ref_ppm}
    _say(f"paper's loop: {ref_wall / n_ref * 1000:.1f} ms per response token -> {ref_ppm:.2f} prompts/min "
         f"at {args.max_new_tokens} tokens")

    # 5. peak memory and the targets
    out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else math.nan
    by_mp = {r["max_prompts"]: r["prompts_per_min"] for r in out["throughput"] if r["engine"] == "token-level"}
    old = {r["max_prompts"]: r["prompts_per_min"] for r in out["throughput"] if r["engine"] != "token-level"}
    by_rows = {r["rows"]: r["x_roofline"] for r in out["decode_step"]}
    out["targets"] = {
        "step_160_rows_within_2x_roofline": by_rows.get(160, math.nan) <= 2.0,
        "max_prompts_32_vs_1": by_mp.get(32, math.nan) / by_mp.get(1, math.nan),
        "max_prompts_32_vs_reference": by_mp.get(32, math.nan) / ref_ppm,
        "token_level_vs_lockstep_at_64": by_mp.get(64, math.nan) / old.get(64, math.nan),
    }
    out["total_s"] = time.perf_counter() - t0
    _say(f"peak GPU memory {out['peak_gpu_gb']:.1f} GB; targets: {json.dumps(out['targets'])}; total {out['total_s']:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    _say(f"wrote {args.out / 'gpu_check.json'}")
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _say(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
