"""NN / LP / FT of a checkpoint from the command line (paper §6.1; the protocols: protocols.py).

It loads our checkpoints and, through the timm / DINO / MoCo-v3 key layout of vit.py,
published ones; the data set, image size and seed default to the checkpoint's training
arguments, so NN reproduces the k-NN train.py logged. Usage::

    python eval.py runs/moco/last.pt                      # NN and LP (the default)
    python eval.py runs/moco/last.pt --finetune --out results.json
    python eval.py --random-init --model cpu --knn        # the "random init" row
    python eval.py --pixel-knn                            # k-NN on raw pixels (a baseline)
    python eval.py dino_deitsmall16_pretrain.pth --model small --data folder --data-root IN100
"""
import argparse
import json
import os
import pickle
import time

import torch

import vit
from checkpoint import load_backbone
from protocols import (PROBE_LRS, dataset_features, finetune, knn_classify, linear_probe,
                       percent_correct, raw_pixel_knn, select_probe_lr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="NN / LP / FT evaluation of a backbone (paper §6.1). With no protocol flag "
                    "it runs --knn --linear; fine-tuning trains the whole network, so it runs "
                    "only when asked.")
    p.add_argument("checkpoint", nargs="?", help="our checkpoint, or a timm / DINO / MoCo-v3 one")
    p.add_argument("--knn", action="store_true", help="NN: weighted k-NN on frozen features")
    p.add_argument("--linear", action="store_true", help="LP: linear probe on frozen features")
    p.add_argument("--finetune", action="store_true", help="FT: full fine-tuning (slow)")
    p.add_argument("--pixel-knn", action="store_true",
                   help="k-NN on raw normalised pixels, a baseline that needs no backbone")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate a freshly initialised ViT (of --model, or of the checkpoint's "
                        "architecture) instead of trained weights")
    p.add_argument("--model", help=f"ViT preset ({', '.join(vit.PRESETS)}) for checkpoints "
                                   "without 'vit_config' and for --random-init")
    p.add_argument("--branch", default="auto", choices=("auto", "online", "target"),
                   help="online (student / base encoder) or target (teacher / momentum) weights; "
                        "auto: what each method's paper reports — DINO's teacher, else online")
    p.add_argument("--data", help="embedded, cifar10, cifar100, stl10, folder "
                                  "(default: the checkpoint's training data, else embedded)")
    p.add_argument("--data-root", help="dataset directory (default: the checkpoint's)")
    p.add_argument("--data-cache", metavar="DIR", help="--data folder: read its decode-once "
                   "cache (python imagecache.py) instead of the image files")
    p.add_argument("--download", action="store_true", help="download torchvision datasets")
    p.add_argument("--img-size", type=int, help="image size (default: the checkpoint's training "
                                                "size); also builds --model for interop checkpoints")
    p.add_argument("--k", type=int, default=20, help="neighbours; 20 as in Wu et al. and DINO")
    p.add_argument("--temperature", type=float, default=0.07,
                   help="k-NN vote temperature; 0.07 as in Wu et al. and DINO")
    p.add_argument("--lp-epochs", type=int, default=100, help="linear-probe epochs (cheap: "
                                                              "cached features)")
    p.add_argument("--lp-lr", type=float, help=f"probe LR (default: best of {PROBE_LRS} on a "
                                               "held-out 10%% of train)")
    p.add_argument("--ft-epochs", type=int, default=10, help="fine-tuning epochs")
    p.add_argument("--ft-lr", type=float, default=5e-4, help="fine-tuning peak AdamW LR")
    p.add_argument("--batch-size", type=int, default=256,
                   help="for feature extraction, the probe and fine-tuning")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init, probe, FT")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("--all-train", action="store_true",
                   help="k-NN and linear probe on the whole training split, also for a run "
                        "pretrained on --data-size of it (less pretraining data, the same "
                        "labelled data: how figures.py compares them)")
    # Caps both splits to N images (build_dataset's size): smoke tests, not reported numbers.
    p.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (args.knn or args.linear or args.finetune or args.pixel_knn):
        args.knn = args.linear = True
    needs_backbone = args.knn or args.linear or args.finetune
    if needs_backbone and args.checkpoint is None and not args.random_init:
        p.error("give a checkpoint path, or --random-init with --model")
    if args.random_init and args.checkpoint is None and args.model is None:
        p.error("--random-init without a checkpoint needs --model "
                f"({', '.join(vit.PRESETS)})")
    if args.model is not None and args.model.removeprefix("vit_") not in vit.PRESETS:
        p.error(f"unknown --model {args.model!r}; allowed: {', '.join(vit.PRESETS)}")
    for name in ("k", "lp_epochs", "ft_epochs", "batch_size", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature <= 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    if args.out is not None and os.path.isdir(args.out):
        p.error(f"--out {args.out!r} is a directory; give a file name such as results.json")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def _backbone(args):
    """The backbone to evaluate (None for --pixel-knn alone) and what its checkpoint says."""
    backbone, info = None, dict(path=args.checkpoint, args=None)
    try:
        if args.checkpoint is not None:
            backbone, info = load_backbone(args.checkpoint, args.model, args.img_size, args.branch)
        if args.random_init:
            config = info.get("config") or vit.build_vit(
                args.model, **({} if args.img_size is None else {"img_size": args.img_size})).config()
            torch.manual_seed(args.seed)
            backbone, info = vit.ViT(**config), {**info, "format": "random-init", "config": config}
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, pickle.UnpicklingError,
            EOFError) as err:
        raise SystemExit(f"eval.py: error: {err}")
    return backbone, info


def _datasets(args, backbone, info):
    """(train, val) EvalDatasets, the data set's name and the image size: defaults from the
    checkpoint's training arguments."""
    import data                                  # only the CLI needs datasets (and torchvision)
    train_args = info.get("args") or {}
    name = args.data or train_args.get("data") or "embedded"
    root = args.data_root or train_args.get("data_root")
    img_size = args.img_size or train_args.get("img_size") or (
        backbone.img_size if backbone is not None else 32)
    # The seed and training-set size of the run, so NN reproduces the k-NN train.py logged
    # (--all-train: the whole split, however many images the run pretrained on).
    same = name == train_args.get("data")
    sizes = dict(train=args.limit or (train_args.get("data_size") if same and not args.all_train
                                      else None),
                 val=args.limit)
    try:
        bases = [data.build_dataset(name, root=root, split=s, img_size=img_size,
                                    download=args.download, seed=train_args.get("seed", 0),
                                    size=sizes[s], cache=args.data_cache) for s in ("train", "val")]
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise SystemExit(f"eval.py: error: dataset {name!r}: {err}")
    train_set, val_set = [data.EvalDataset(b, img_size) for b in bases]
    return train_set, val_set, name, img_size


def _measure(args, backbone, train_set, val_set, num_classes, device):
    """Run the asked protocols: ({protocol: dict(top1=…, settings, seconds)}, "NN 41.3 | …")."""
    results, table = {}, []
    start = time.time()
    if args.pixel_knn:
        acc = raw_pixel_knn(train_set, val_set, args.k, args.temperature)
        results["pixel_knn"] = dict(top1=acc, k=args.k, temperature=args.temperature,
                                    seconds=round(time.time() - start, 1))
        table.append(f"PX {acc:.1f}")
    if args.knn or args.linear:
        backbone.to(device)
        feats = [dataset_features(backbone, ds, device, args.batch_size, args.num_workers)
                 for ds in (train_set, val_set)]
        (train_feats, train_labels), (val_feats, val_labels) = feats
        results["feature_seconds"] = round(time.time() - start, 1)
    if args.knn:
        start = time.time()
        preds = knn_classify(train_feats, train_labels, val_feats, args.k, args.temperature,
                             num_classes)
        acc = percent_correct(preds, val_labels)
        results["knn"] = dict(top1=acc, k=args.k, temperature=args.temperature,
                              seconds=round(time.time() - start, 1))
        table.append(f"NN {acc:.1f}")
    if args.linear:
        start, lr, sweep = time.time(), args.lp_lr, None
        if lr is None:
            lr, sweep = select_probe_lr(train_feats, train_labels, epochs=args.lp_epochs,
                                        batch_size=args.batch_size, seed=args.seed)
        acc = linear_probe(train_feats, train_labels, val_feats, val_labels, args.lp_epochs, lr,
                           batch_size=args.batch_size, seed=args.seed, num_classes=num_classes)
        results["linear"] = dict(top1=acc, lr=lr, epochs=args.lp_epochs,
                                 heldout_sweep={str(k): v for k, v in (sweep or {}).items()},
                                 seconds=round(time.time() - start, 1))
        table.append(f"LP {acc:.1f}")
    if args.finetune:
        start = time.time()
        acc = finetune(backbone, train_set, val_set, num_classes, device, epochs=args.ft_epochs,
                       lr=args.ft_lr, batch_size=args.batch_size, seed=args.seed,
                       num_workers=args.num_workers)
        results["finetune"] = dict(top1=acc, lr=args.ft_lr, epochs=args.ft_epochs,
                                   seconds=round(time.time() - start, 1))
        table.append(f"FT {acc:.1f}")
    return results, " | ".join(table)


def main(argv=None):
    args = parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    backbone, info = _backbone(args)
    train_set, val_set, name, img_size = _datasets(args, backbone, info)
    num_classes = len(train_set.classes)
    print(f"{info.get('format', 'pixels')} {info.get('path') or ''}".strip() + f" | {name}: "
          f"{len(train_set)} train / {len(val_set)} val, {num_classes} classes, {img_size} px, "
          f"{device}", flush=True)
    results = dict(checkpoint=args.checkpoint, format=info.get("format"),
                   branch=info.get("branch", args.branch), config=info.get("config"), data=name,
                   img_size=img_size, n_train=len(train_set), n_val=len(val_set),
                   all_train=args.all_train)
    measured, table = _measure(args, backbone, train_set, val_set, num_classes, device)
    results.update(measured)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
