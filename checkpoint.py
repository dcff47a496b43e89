"""Checkpoints of a run: written atomically, checked before they are read, restored whole.

Concern: what makes a days-long run survive being killed (train.py's ``--resume``): every
file is written to ``*.tmp`` and renamed, so a kill mid-save leaves the previous checkpoint
intact; a checkpoint holds the settings it was trained with, and a resume with other
settings, or into a model of another shape, is refused with every difference listed — never
a silent partial load; the RNG streams of every rank are saved and restored, so a resumed run
ends with the weights of an uninterrupted one.

    from checkpoint import save_atomic, state_dict_mismatch
    save_atomic({"step": 1}, "runs/x/last.pt")          # last.pt.tmp, fsync, rename
    state_dict_mismatch(model, torch.load("other.pt"))   # ['  blocks.0.attn.qkv.weight: ...']
"""
import os
import random
import shutil

import numpy as np
import torch


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a kill mid-save leaves the old file intact.

    os.replace is atomic on POSIX: a reader sees the old file or the new one, never a mix.
    fsync first, so that after a power cut the rename cannot point at unwritten blocks."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_atomic(src, path):
    shutil.copyfile(src, path + ".tmp")
    with open(path + ".tmp", "rb+") as f:
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def seed_all(seed, rank):
    """Seed torch, numpy and random with seed + rank: each rank draws its own token-dropout
    subsets (augmentation is a function of (seed, epoch, image index) instead, see data.py)."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# Arguments that define what is trained: a resume must not change them.
FIXED_ARGS = ("method", "data", "model", "img_size", "patch_size", "batch_size", "budget", "lr",
              "weight_decay", "lr_schedule", "warmup", "accel", "cost", "symmetric",
              "local_crops", "seed", "data_size")


def check_out_dir(args):
    """Refuse to clobber a previous run unless told to; returns the checkpoint to resume or None.

    A ``*.pt.tmp`` beside it is what a save interrupted by a kill leaves; it is never read
    (the rename did not happen, so last.pt is still the previous, complete checkpoint)."""
    last = os.path.join(args.out, "last.pt")
    previous = os.path.isdir(args.out) and any(
        f in os.listdir(args.out) for f in ("last.pt", "log.jsonl"))
    if args.resume:
        return last if os.path.isfile(last) else None
    if previous and not args.overwrite:
        raise SystemExit(f"error: --out {args.out} holds a previous run (last.pt / log.jsonl); "
                         "pass --resume to continue it or --overwrite to replace it")
    return None


def state_dict_mismatch(module, saved, limit=20):
    """One line per parameter / buffer that is missing, unexpected or of another shape."""
    own = module.state_dict()
    shape = lambda t: tuple(t.shape) if hasattr(t, "shape") else type(t).__name__  # noqa: E731
    lines = [f"  {k}: in the model {shape(v)}, not in the checkpoint" for k, v in own.items()
             if k not in saved]
    lines += [f"  {k}: in the checkpoint {shape(v)}, not in the model" for k, v in saved.items()
              if k not in own]
    lines += [f"  {k}: checkpoint {shape(saved[k])} vs model {shape(v)}" for k, v in own.items()
              if k in saved and shape(saved[k]) != shape(v)]
    return lines[:limit] + ([f"  ... and {len(lines) - limit} more"] if len(lines) > limit else [])


def read_checkpoint(path, args, accel):
    """The checkpoint to resume, if it was written by a run with these settings: it is read
    before any data, so that a wrong --resume fails at once, naming the file and what differs."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:                   # truncated, corrupt, or not a torch file at all
        raise SystemExit(f"error: cannot read the checkpoint {path} ({type(e).__name__}: "
                         f"{str(e)[:200]}); move it away to start afresh") from None
    needed = ("args", "method", "optimizer", "state", "rng")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in needed):
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"error: {path} is not a checkpoint written by train.py (it holds "
                         f"{keys}; expected {', '.join(needed)})")
    saved = ckpt["args"]
    changed = [f"{k}: {saved.get(k)!r} → {getattr(args, k)!r}" for k in FIXED_ARGS
               if saved.get(k) != getattr(args, k)]
    if "accel" in ckpt and ckpt["accel"] != accel.to_json():     # the schedule file was edited
        changed.append(f"stage schedule {args.accel}: {ckpt['accel']} → {accel.to_json()}")
    if changed:
        raise SystemExit(f"error: --resume from {path} with different settings: "
                         + "; ".join(changed) + " (use another --out for a new run)")
    return ckpt


def restore(ckpt, path, args, backbone, method, optimizer):
    """Weights and optimizer state from ``ckpt``. Never a partial load: names, shapes and the
    ViT configuration are compared first, and every difference is listed."""
    problems = []
    if ckpt.get("vit_config", backbone.config()) != backbone.config():
        problems.append(f"  ViT configuration: checkpoint {ckpt['vit_config']} vs "
                        f"model {backbone.config()}")
    problems += state_dict_mismatch(method, ckpt["method"])
    if problems:
        raise SystemExit(f"error: the checkpoint {path} does not fit the {args.method} model "
                         f"built from these settings:\n" + "\n".join(problems))
    method.load_state_dict(ckpt["method"])              # strict: names and shapes checked above
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as e:
        raise SystemExit(f"error: the optimizer state in {path} does not fit this model ({e})")
