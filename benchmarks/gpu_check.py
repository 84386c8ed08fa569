"""Everything that needs a GPU, in one run: the CUDA-marked tests and three measurements.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out DIR          # on a CUDA machine, under 10 minutes
    python benchmarks/gpu_check.py --report DIR/gpu_check.json      # then here: the `gpu` section of the docs
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out DIR --quick --device cpu   # smoke test of the script itself

Needs only torch, lightning and pytest (no install of this package: ``PYTHONPATH=.``). Writes
``DIR/gpu_check.json`` (every number), ``DIR/gpu_check.md`` (the section for ``docs/benchmarks.md``; ``--docs``
writes it there too, which needs the package's own dependencies) and ``DIR/pytest.log``. The measurements, each
with CUDA events, median of ``--rounds`` after warm-up:

1. fp16 AMP with a ``GradScaler``: an MLP pruned to 90% by ``GradualMagnitudePruning`` (events every 5 steps) with an
   infinite loss every 10th step: steps the scaler skipped, masked weights that were not exactly 0.0 after any step
   (must be 0), and the step time against the same model trained dense.
2. M-FAC on the GPU: ``SlidingInverseFisher.update_ihvp`` against its floor (the two float32 products with the
   window) for distinct and repeated gradients, and the relative error of F^-1 g and of ``ihvp`` inside the window's
   span against float64.
3. 2:4 semi-structured kernels: ``nn.Linear`` layers pruned with ``pattern="2:4"`` through
   ``torch.sparse.to_sparse_semi_structured``, fp16 and bf16, time against the dense layer and the largest output
   difference.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).parents[1]


def cuda_time(fn, rounds: int, device: torch.device) -> float:
    """Median seconds of ``fn`` over ``rounds`` calls after two warm-ups (CUDA events on a GPU)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def run_cuda_tests(out: Path, device: torch.device) -> dict:
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_cuda.py"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    (out / "pytest.log").write_text(result.stdout + result.stderr)
    return {"returncode": result.returncode, "summary": (result.stdout.strip().splitlines() or [""])[-1]}


def amp_check(device: torch.device, quick: bool, rounds: int) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision
    from torch.utils.data import DataLoader, TensorDataset

    from sparse_lightning import GradualMagnitudePruning, masks_of

    width, steps = (64, 20) if quick else (2048, 200)

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
            self.head = nn.Linear(width, 10)
            self.step_times: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.head(self.net(x)), y)
            return loss * float("inf") if self.global_step % 10 == 9 else loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Probe(pl.Callback):
        def __init__(self) -> None:
            self.bad, self.skipped, self.times = 0, 0, []
            self._began = 0.0

        def on_train_batch_start(self, trainer, pl_module, *args) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            self._began = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._began)
            params = dict(pl_module.named_parameters())
            self.bad += sum(int((params[n][~m] != 0).sum()) for n, m in masks_of(pl_module).items())

    data = TensorDataset(torch.randn(steps * 64, 256), torch.randint(0, 10, (steps * 64,)))
    results = {}
    for name, pruned in (("dense", False), ("pruned", True)):
        torch.manual_seed(0)
        model, probe = MLP(), Probe()
        scaler = torch.amp.GradScaler(device.type)
        callbacks = [probe]
        if pruned:
            callbacks.insert(0, GradualMagnitudePruning(sparsity=0.9, start=0, end=0.5, every=5, log_sparsity=False))
        trainer = pl.Trainer(
            accelerator=device.type,
            devices=1,
            max_steps=steps,
            plugins=[MixedPrecision("16-mixed", device.type, scaler=scaler)],
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, DataLoader(data, batch_size=64))
        results[name] = {
            "median_step_s": statistics.median(probe.times[len(probe.times) // 5 :]),
            "nonzero_masked_after_steps": probe.bad,
            "final_scale": float(scaler.get_scale()),
            "steps_with_inf_loss": steps // 10,
        }
    results["step_ratio"] = results["pruned"]["median_step_s"] / results["dense"]["median_step_s"]
    return results


def window_timing(kind: str, dim: int, m: int, device: torch.device, rounds: int) -> dict:
    """``update_ihvp`` against the two float32 window products, each call with the next gradient of the stream."""
    from sparse_lightning.mfac import SlidingInverseFisher

    generator = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(8, dim, device=device, generator=generator)

    def gradient(i: int) -> torch.Tensor:
        return base[i % 8] if kind == "repeated" else torch.randn(dim, device=device, generator=generator)

    fisher = SlidingInverseFisher(dim, m, 1e-5, device=device)
    for i in range(m):
        fisher.update(gradient(i))
    plain = torch.randn(m, dim, device=device, generator=generator)
    coef = torch.randn(m, device=device, generator=generator)
    g = gradient(m)
    stream = iter([gradient(m + 1 + i) for i in range(rounds + 2)])
    floor = cuda_time(lambda: (plain @ g, coef @ plain), rounds, device)
    update = cuda_time(lambda: fisher.update_ihvp(next(stream)), rounds, device)
    return {"floor_ms": 1000 * floor, "update_ms": 1000 * update, "ratio": update / floor, "exact": fisher.exact}


def mfac_check(device: torch.device, quick: bool, rounds: int) -> dict:
    from sparse_lightning.mfac import SlidingInverseFisher, StaticInverseFisher

    damp = 1e-5
    dim, m = (20_000, 32) if quick else (4_000_000, 1024)
    out = {"dim": dim, "num_grads": m}
    for kind in ("distinct", "repeated"):
        out[kind] = window_timing(kind, dim, m, device, rounds)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    small_dim, small_m = 50_000, 64
    stream = torch.randn(small_m + 1, small_dim, generator=torch.Generator().manual_seed(1))
    stream *= (1e6 * damp * small_m / small_dim) ** 0.5
    fisher = SlidingInverseFisher(small_dim, small_m, damp, device=device)
    for g in stream[:-1]:
        fisher.update(g.to(device))
    product = fisher.update_ihvp(stream[-1].to(device)).cpu().double()
    exact = StaticInverseFisher(stream[-small_m:].double(), damp)
    reference = exact.ihvp(stream[-1].double())
    inside = exact.ihvp(stream[-4].double())
    out["precision"] = {
        "update_ihvp": float((product - reference).norm() / reference.norm()),
        "ihvp_in_span": float((fisher.ihvp(stream[-4].to(device)).cpu().double() - inside).norm() / inside.norm()),
    }
    return out


def semi_structured_check(device: torch.device, quick: bool, rounds: int) -> dict:
    if device.type != "cuda":
        return {"skipped": "to_sparse_semi_structured needs CUDA"}
    from torch.sparse import to_sparse_semi_structured

    from sparse_lightning.core.distribution import pruned_units
    from sparse_lightning.core.patterns import parse_pattern

    pattern = parse_pattern("2:4")
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for features, batch in ((4096, 4096), (8192, 8192)) if not quick else ((1024, 1024),):
            layer = nn.Linear(features, features, bias=False).to(device=device, dtype=dtype)
            score = layer.weight.detach().abs().float()
            pruned = pruned_units({"w": score}, pattern, 0.5, "uniform")["w"]
            keep = pattern.keep_mask(score, pruned)
            with torch.no_grad():
                layer.weight.mul_(keep)
            x = torch.randn(batch, features, device=device, dtype=dtype)
            dense_out = layer(x)
            sparse_weight = to_sparse_semi_structured(layer.weight.detach())
            sparse_out = nn.functional.linear(x, sparse_weight)
            dense_t = cuda_time(lambda layer=layer, x=x: layer(x), rounds, device)
            sparse_t = cuda_time(lambda w=sparse_weight, x=x: nn.functional.linear(x, w), rounds, device)
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "features": features,
                    "batch": batch,
                    "dense_ms": 1000 * dense_t,
                    "sparse_ms": 1000 * sparse_t,
                    "speedup": dense_t / sparse_t,
                    "max_abs_diff": float((dense_out - sparse_out).abs().max()),
                    "kept_fraction": float(keep.float().mean()),
                }
            )
    return {"layers": rows}


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "## GPU checks",
        "",
        f"`PYTHONPATH=. python3 benchmarks/gpu_check.py --out DIR` on {env['device_name']} (torch "
        f"{env['torch']}, CUDA {env['cuda']}); CUDA events, median of {results['rounds']} rounds after warm-up.",
        "",
        f"- CUDA-marked tests (`pytest -m cuda tests/test_cuda.py`): {results['tests']}",
    ]
    amp = results["amp"]
    lines.append(
        f"- fp16 AMP with a `GradScaler`, an infinite loss every 10th step, 90% `GradualMagnitudePruning`: masked "
        f"weights not exactly 0.0 after a step: {amp['pruned']['nonzero_masked_after_steps']} (target 0); step time "
        f"pruned / dense **{amp['step_ratio']:.3f}x** ({1000 * amp['pruned']['median_step_s']:.2f} ms against "
        f"{1000 * amp['dense']['median_step_s']:.2f} ms)."
    )
    mfac = results["mfac"]
    lines.append(
        f"- M-FAC on the GPU, d = {mfac['dim']:,}, m = {mfac['num_grads']}: `update_ihvp` / floor (two float32 "
        f"window products) **{mfac['distinct']['ratio']:.2f}x** with distinct gradients, "
        f"**{mfac['repeated']['ratio']:.2f}x** with 8 repeated ones (exact mode: {mfac['repeated']['exact']}); "
        f"relative error against float64: F^-1 g {mfac['precision']['update_ihvp']:.1e}, `ihvp` inside the span "
        f"{mfac['precision']['ihvp_in_span']:.1e} (target <= 1e-3)."
    )
    semi = results["semi_structured"]
    if "layers" in semi:
        lines += [
            "",
            "2:4 semi-structured kernels (`torch.sparse.to_sparse_semi_structured`) on `nn.Linear` layers pruned "
            'with `pattern="2:4"`, batch x features input:',
            "",
            "| dtype | features | batch | dense ms | 2:4 ms | speed-up | max abs diff |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in semi["layers"]:
            lines.append(
                f"| {r['dtype']} | {r['features']} | {r['batch']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | "
                f"**{r['speedup']:.2f}x** | {r['max_abs_diff']:.2e} |"
            )
    else:
        lines.append(f"- 2:4 kernels: {semi['skipped']}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path, help="only write the `gpu` section from a gpu_check.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the script, measures nothing")
    parser.add_argument("--docs", action="store_true", help="also rewrite the `gpu` section of docs/benchmarks.md")
    args = parser.parse_args()
    if args.report:
        write_docs(markdown(json.loads(args.report.read_text())))
        return
    if args.out is None:
        parser.error("--out is required")
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "rounds": args.rounds,
        "environment": {
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
    }
    steps = [
        ("tests", lambda: run_cuda_tests(args.out, device)),
        ("amp", lambda: amp_check(device, args.quick, args.rounds)),
        ("mfac", lambda: mfac_check(device, args.quick, args.rounds)),
        ("semi_structured", lambda: semi_structured_check(device, args.quick, args.rounds)),
    ]
    for name, step in steps:
        began = time.perf_counter()
        results[name] = step()
        print(f"{name}: {time.perf_counter() - began:.0f}s {json.dumps(results[name])[:400]}", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    (args.out / "gpu_check.md").write_text(text + "\n")
    print(text)
    if args.docs:
        write_docs(text)


def write_docs(text: str) -> None:
    from sparse_lightning.bench import write_doc_section

    write_doc_section(ROOT / "docs" / "benchmarks.md", "gpu", text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
