"""Speed of whole training steps: each method's step beside its loader, and AdamW's two
implementations (bench.py's ``methods`` and ``adamw`` sections; bench.py's docstring says
what each figure means).

Concern: what one step of SimCLR / MoCo-v3 / DINO costs with its heads, loss and momentum
update, uncompressed and compressed, against what the data loader can feed it; and which AdamW
implementation that step should use.
"""
import math
import time

import torch

import augment
import compress
import data
import methods
import vit
from bench_loader import loader_base, loader_rate
from bench_timing import interleaved_times, make_adamw, sync

# ================================================== methods: a whole training step
def method_step(method, opt, views, strategy, device):
    """One training step as train.py takes it: loss (bf16 autocast on GPU), backward, AdamW,
    momentum / teacher update."""
    def step():
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = method(views[:strategy.views], strategy.q, strategy.k, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.update_target(0.5)
        sync(device)
        return dict(total=time.perf_counter() - t0)
    return step


def bench_methods(args, device):
    """Images/s of each method's step, uncompressed and compressed, beside its loader's."""
    rows = []
    peak = f", MFU against {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else ""
    print(f"# methods: images/s of a whole training step (forward, backward, AdamW, momentum "
          f"update) on {device}, {torch.get_num_threads()} thread(s), {args.warmup} warm-up + "
          f"{args.steps} timed rounds interleaved{peak}; loader: images/s of ONE loader process "
          f"(one thread), per-image / batched augmentation")
    head = (f"{'model':<6}{'method':<8}{'batch':>6} {'strategy':<34}{'ms/step':>9}{'img/s':>8}"
            + (f"{'MFU':>7}" if args.peak_tflops else "")
            + f"{'loader per-image':>18}{'batched':>9}  verdict (per-image / batched)")
    print(head)
    for model_name in args.models:
        p0, img = vit.PRESETS[model_name]["patch_size"], vit.PRESETS[model_name]["img_size"]
        batch = args.batch_size or (64 if img <= 64 else 8)
        # the most compressed stage of the default schedule: drop 0.75 and twice the base patch
        compressed = f"q:drop=0.75,patch={2 * p0};k:patch={2 * p0}"
        strategies = {"none": compress.NONE, compressed: compress.Strategy.parse(compressed)}
        base = loader_base(img, (1 + args.steps) * batch)
        for name in [m for m in ("simclr", "moco", "dino") if m in args.methods]:
            torch.manual_seed(0)
            backbone = vit.build_vit(model_name)
            method = methods.build_method(name, backbone, **methods.head_sizes(name, backbone.dim))
            method = method.to(device).train()
            opt = make_adamw([p for p in method.parameters() if p.requires_grad])
            recipes = augment.build_views(name, img, colour="strong" if img <= 64 else "official")
            views = [torch.randn(batch, 3, r.size, r.size, device=device) for r in recipes]
            steps = {s: method_step(method, opt, views, st.resolve(len(views)), device)
                     for s, st in strategies.items()}
            times = interleaved_times(steps, args.warmup, args.steps)
            loader = {kind: loader_rate(data.ViewDataset(base, recipes, batched=b), batch, 0,
                                        args.steps)
                      for kind, b in (("per_image", False), ("batched", True))}
            # FLOPs of a sample = its units (views × f(L_view)/f(L_base) × 3 with gradient,
            # × 1 without: the budget's own count) × f(L_base), the base forward FLOPs.
            # (MFU is not checked on a GPU yet: none was at hand when this was written.)
            cost = compress.CostModel(backbone)
            for s, st in strategies.items():
                ips = batch / times[s]["total"]
                flops = ips * cost.sample_units(name, st.resolve(len(views))) * cost.base  # FLOP/s
                verdict = ["model-bound" if loader[k] >= ips else
                           f"loader-bound (≥{math.ceil(ips / loader[k])} workers)"
                           for k in ("per_image", "batched")]
                rows.append(dict(model=model_name, method=name, batch=batch, strategy=s,
                                 ms_per_step=1e3 * times[s]["total"], images_per_s=ips,
                                 flop_per_s=flops,
                                 mfu=flops / (args.peak_tflops * 1e12) if args.peak_tflops else None,
                                 loader_per_image=loader["per_image"],
                                 loader_batched=loader["batched"], verdict=verdict))
                print(f"{model_name:<6}{name:<8}{batch:>6} {s:<34}{1e3 * times[s]['total']:>9.1f}"
                      f"{ips:>8.0f}" + (f"{rows[-1]['mfu']:>6.1%} " if args.peak_tflops else "")
                      + f"{loader['per_image']:>18.0f}{loader['batched']:>9.0f}  "
                      f"{verdict[0]} / {verdict[1]}", flush=True)
    return dict(rows=rows)


# ======================================================= adamw: foreach vs fused
def bench_adamw(args, device):
    """One AdamW step over a preset's backbone + SimCLR head: foreach vs fused, interleaved."""
    rows = []
    print(f"# adamw: one optimizer step on {device}, {torch.get_num_threads()} thread(s), "
          f"{args.warmup} warm-up + {args.steps} timed rounds interleaved")
    print(f"{'model':<6}{'params':>10}{'foreach ms':>12}{'fused ms':>10}{'fused speed-up':>16}")
    for model_name in args.adamw_models:
        torch.manual_seed(0)
        backbone = vit.build_vit(model_name)
        method = methods.build_method("simclr", backbone, **methods.head_sizes("simclr", backbone.dim))
        params = [p for p in method.to(device).parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        try:
            opts = {"foreach": make_adamw(params, fused=False), "fused": make_adamw(params, fused=True)}
        except RuntimeError as e:      # no fused AdamW for this device in this torch
            print(f"{model_name:<6} fused AdamW unavailable here ({e}); skipped")
            rows.append(dict(model=model_name, skipped=str(e)))
            continue

        def timed(opt):
            def step():
                sync(device)
                t0 = time.perf_counter()
                opt.step()
                sync(device)
                return dict(total=time.perf_counter() - t0)
            return step
        times = interleaved_times({k: timed(o) for k, o in opts.items()}, args.warmup, args.steps)
        ms = {k: 1e3 * t["total"] for k, t in times.items()}
        n = sum(p.numel() for p in params)
        rows.append(dict(model=model_name, params=n, ms_foreach=ms["foreach"], ms_fused=ms["fused"],
                         speedup=ms["foreach"] / ms["fused"]))
        print(f"{model_name:<6}{n:>10,}{ms['foreach']:>12.2f}{ms['fused']:>10.2f}"
              f"{ms['foreach'] / ms['fused']:>15.2f}×", flush=True)
    return dict(rows=rows)
