"""Checkpoints of a run: written atomically, checked before they are read, restored whole.

Concern: what makes a days-long run survive being killed, and its disk failing (train.py's
``--resume``): every file is written to ``*.tmp`` and renamed, so a kill mid-save leaves the
previous checkpoint intact, and a failed write (disk full, I/O error) says where and why and
leaves it too; the previous ``last.pt`` is kept as ``last-1.pt`` (``--keep-last``); a
checkpoint carries a checksum of its content, and a resume that finds ``last.pt`` damaged
falls back to the newest good one; a checkpoint holds the settings it was trained with, and a
resume with other settings, or into a model of another shape, is refused with every
difference listed — never a silent partial load; the RNG streams of every rank are saved and
restored, so a resumed run ends with the weights of an uninterrupted one. It also reads
backbones out of published checkpoints (timm, DINO, MoCo-v3) for evaluation, through vit.py's
key layout. Every checkpoint is read by ``load``: tensors and a few plain types only, never
code — a file that needs more is refused unless its reader trusts it (``--trust-checkpoint``).

    from checkpoint import save_checkpoint, load, load_checked, state_dict_mismatch, load_backbone
    backbone, info = load_backbone("dino_deitsmall16_pretrain.pth", model="small")  # any layout
    save_checkpoint({"step": 1}, "runs/x/last.pt", keep=2)  # .tmp, fsync, last-1.pt, rename
    load_checked("runs/x/last.pt")          # BadCheckpoint if damaged, UntrustedCheckpoint if
    state_dict_mismatch(model, load("other.pt"))    # it holds code; ['  blocks.0.attn...: ...']
"""
import argparse
import contextlib
import copy
import hashlib
import os
import pickle
import random
import re
import shutil
import threading

import numpy as np
import torch

import vit


# ====================================================== writing: atomic, checked, rotated
class SaveError(OSError):
    """A checkpoint could not be written (disk full, I/O error, permission); the previous
    file at its path is intact. The message names the path, the error and the space left."""


def _write_failed(path, e):
    """SaveError for ``e``, after removing the partial file (which frees the space it held)."""
    with contextlib.suppress(OSError):
        os.remove(path + ".tmp")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free on its disk"
    except OSError:
        free = "free space unknown"
    return SaveError(e.errno, f"cannot write {path}: {e.strerror or e} ({free}); the previous "
                              "file there is intact")


def rotate(path, keep):
    """path-(keep-2) → path-(keep-1), ..., path-1 → path-2 (the oldest dropped), then path is
    linked as path-1: ``keep`` files in all once ``path`` is replaced. ``path`` itself stays in
    place until that replace, so a kill at any moment leaves a complete ``last.pt``."""
    if keep < 2 or not os.path.exists(path):
        return
    stem, ext = os.path.splitext(path)
    older = [f"{stem}-{i}{ext}" for i in range(1, keep)]
    for src, dst in reversed(list(zip(older, older[1:]))):
        if os.path.exists(src):
            os.replace(src, dst)
    with contextlib.suppress(FileNotFoundError):
        os.remove(older[0])
    try:
        os.link(path, older[0])                  # no copy: the same blocks under a second name
    except OSError:                              # a file system without hard links
        shutil.copyfile(path, older[0])


def save_atomic(obj, path, keep=1):
    """Write to a temporary file, then rename: a kill mid-save leaves the old file intact.

    os.replace is atomic on POSIX: a reader sees the old file or the new one, never a mix.
    fsync first, so that after a power cut the rename cannot point at unwritten blocks. The
    previous file is kept as path-1 (``keep`` files in all; ``rotate``) only once the new
    one is complete. A failed write (ENOSPC, EIO, EACCES) raises SaveError, with nothing left
    but the previous files."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        rotate(path, keep)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_failed(path, e) from None


def copy_atomic(src, path, keep=1):
    """``save_atomic`` of a copy of the file ``src``."""
    try:
        shutil.copyfile(src, path + ".tmp")
        with open(path + ".tmp", "rb+") as f:
            os.fsync(f.fileno())
        rotate(path, keep)
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise _write_failed(path, e) from None


def checksum(tree):
    """sha256 of a checkpoint's content: every tensor's dtype, shape and bytes, every array's,
    every other value's repr, dict keys in sorted order. Taken of the object (not the file),
    so a reader checks exactly what torch.load gave it; ~1 s per GB."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, np.ndarray):
            h.update(f"A{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())
    feed(tree)
    return h.hexdigest()


def save_checkpoint(ckpt, path, keep=1):
    """A training checkpoint (a dict) with its checksum, atomically (``save_atomic``)."""
    save_atomic({**ckpt, "checksum": checksum(ckpt)}, path, keep)


def host_copy(tree):
    """A copy of a checkpoint's tree whose tensors are in host memory and owned by it: the
    training loop may change its weights in place the moment this returns."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: host_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(host_copy(v) for v in tree)
    return copy.deepcopy(tree)


class BackgroundWriter:
    """Rank 0's checkpoint writes, in a thread beside the next training steps.

    ``submit`` copies the checkpoint to host memory (``host_copy``: a device-to-host copy, or
    a memcpy on CPU; all the step loop waits for) and returns; the thread then does what took
    the time: the checksum (~1 s per GB), torch.save, fsync, the rotation and the copies to
    the other paths. One write at a time: ``wait`` before the next ``submit``; it says how the
    write in flight ended. Its files are never half-visible (``save_atomic``'s .tmp and
    rename), so a kill during a background write leaves the previous ones."""

    def __init__(self):
        self._thread, self._outcome = None, None

    def submit(self, ckpt, paths, keeps, tag):
        assert self._thread is None, "wait() for the write in flight first"
        snapshot = host_copy(ckpt)
        self._thread = threading.Thread(target=self._write, args=(snapshot, paths, keeps, tag),
                                        name="checkpoint-writer")
        self._thread.start()

    def _write(self, ckpt, paths, keeps, tag):
        try:
            save_checkpoint(ckpt, paths[0], keeps[0])
            for path, keep in zip(paths[1:], keeps[1:]):
                copy_atomic(paths[0], path, keep)
            self._outcome = (tag, None)
        except Exception as e:                  # SaveError; anything else is a bug, raised
            self._outcome = (tag, e)

    def wait(self):
        """(tag, None) once the write in flight is on disk, (tag, SaveError) if it failed;
        (None, None) with none in flight. Any other error of the write is raised here."""
        if self._thread is None:
            return None, None
        self._thread.join()
        (tag, error), self._thread, self._outcome = self._outcome, None, None
        if error is not None and not isinstance(error, SaveError):
            raise error
        return tag, error


# ==================================================== reading: tensors and plain types only
# A pickle is a program: unpickled fully, a file runs whatever function its __reduce__ names
# (os.system, ...) as it loads. A checkpoint from the internet, or from a folder others can
# write to, must not run code as whoever reads it. So every checkpoint is read by torch's
# restricted unpickler (weights_only=True): tensors, dicts, lists, tuples, numbers, strings,
# and the few plain types below — all that ours (older ones included) and the published ones
# hold.
_RECONSTRUCT = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
ALLOWED = [
    argparse.Namespace,           # the arguments saved by DINO, DeiT and timm's train.py
    # numpy's RNG state as checkpoints before plain-number states held it (rng_state): a
    # uint32 array (624,), built by _reconstruct, which numpy < 2.1 names numpy.core...
    np.ndarray, np.dtype, type(np.dtype(np.uint32)),
    (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
    (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
]
# How torch's restricted unpickler names what it refused to build: a global (a class or a
# function), an object of a type, or a function it would call.
_REFUSED = re.compile(r"GLOBAL (\S+)|but got <class '([^']+)'>"
                      r"|unrecognized function (<[^>]*>|\S+)")


class BadCheckpoint(ValueError):
    """A checkpoint file that cannot be read, or whose content fails its checksum."""


class UntrustedCheckpoint(ValueError):
    """A checkpoint that needs more than tensors and ``ALLOWED`` to load: unpickling it would
    build ``needs`` (a class or function its pickle names), which could run code. Refused,
    naming the file, ``needs`` and the opt-in."""

    def __init__(self, path, needs):
        self.path, self.needs = path, needs
        super().__init__(
            f"{path} refused: loading it would build {needs}, which is neither a tensor nor one "
            "of the plain types a checkpoint holds, and unpickling it could run code from the "
            "file; if you trust where the file comes from, pass --trust-checkpoint to load it "
            "fully")


def load(path, trust=False):
    """A checkpoint file's content, on the CPU, unpickling only tensors and ``ALLOWED``.

    Raises UntrustedCheckpoint if it needs more, unless ``trust`` (--trust-checkpoint): then
    it is unpickled fully, whatever it runs. Any other failure (a damaged or foreign file) is
    torch's own error. The allow-list holds for this call only, not for other torch.load's."""
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(ALLOWED):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _REFUSED.search(str(e))
        if refused is None:                     # not a refusal: a file damaged or not a pickle
            raise
        raise UntrustedCheckpoint(path, next(g for g in refused.groups() if g)) from None


def load_checked(path, trust=False):
    """``load`` of one of our checkpoints, then its checksum verified (files written before
    checkpoints carried one are read unchecked). Raises BadCheckpoint saying what is wrong,
    UntrustedCheckpoint for a file that needs ``trust``."""
    try:
        ckpt = load(path, trust)
    except UntrustedCheckpoint:
        raise
    except Exception as e:                   # truncated, corrupt, or not a torch file at all
        raise BadCheckpoint(f"unreadable ({type(e).__name__}: {str(e)[:160]})") from None
    if isinstance(ckpt, dict) and "checksum" in ckpt:
        if checksum({k: v for k, v in ckpt.items() if k != "checksum"}) != ckpt["checksum"]:
            raise BadCheckpoint("its content does not match its checksum (damaged on disk)")
    return ckpt


def seed_all(seed, rank):
    """Seed torch, numpy and random with seed + rank: each rank draws its own token-dropout
    subsets (augmentation is a function of (seed, epoch, image index) instead, see data.py)."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def rng_state():
    """This rank's RNG streams: torch's CPU one, numpy's, Python's and, on a GPU, the one of
    this rank's own device (the current one), not every visible device's: a resume on a node
    that shows another number of devices (or one per process) restores it all the same.
    numpy's (MT19937: a key of 624 uint32, a position, a cached Gaussian) is kept as plain
    numbers, its key a list of ints: a checkpoint then holds nothing but tensors and plain
    values, and loads with torch.load's defaults anywhere (``load`` allows an array for the
    checkpoints written before)."""
    on_gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(), numpy=(name, key.tolist(), pos, has_gauss, gauss),
                python=random.getstate(), cuda=torch.cuda.get_rng_state() if on_gpu else None)


def set_rng_state(s):
    """Put back ``rng_state()``. Checkpoints written before it kept one state per visible GPU
    (a list): the entry of this rank's device is taken when there is one."""
    torch.set_rng_state(s["torch"])
    name, key, *rest = s["numpy"]                       # key: a list, or an array (before)
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    random.setstate(s["python"])
    cuda = s["cuda"]
    if isinstance(cuda, (list, tuple)):        # one per GPU the writing rank saw: its own was
        index = 0 if len(cuda) == 1 else int(os.environ.get("LOCAL_RANK", 0))  # its local rank's
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


# Arguments that define what is trained: a resume must not change them.
FIXED_ARGS = ("method", "data", "model", "img_size", "patch_size", "batch_size", "budget", "lr",
              "weight_decay", "lr_schedule", "warmup", "accel", "cost", "symmetric",
              "local_crops", "seed", "data_size", "views", "auto_grid", "auto_at", "auto_batches",
              "auto_tolerance", "momentum", "clip_grad", "weight_decay_end", "min_lr", "out_dim",
              "teacher_temp", "warmup_teacher_temp", "warmup_teacher_temp_frac", "freeze_last_layer",
              "stop_grad_conv1", "pos_embed", "proj_dim", "lambd", "colour", "crop_scale",
              "jitter_strength", "hue", "grayscale", "blur", "solarize", "local_crop_scale",
              "local_size")


def check_out_dir(args):
    """Refuse to clobber a previous run unless told to; returns the checkpoints a --resume may
    continue from, newest first (``resumable``), or [] to start afresh.

    A ``*.pt.tmp`` beside them is what a save interrupted by a kill leaves; it is never read
    (the rename did not happen, so last.pt is still the previous, complete checkpoint)."""
    previous = os.path.isdir(args.out) and any(
        f in os.listdir(args.out) for f in ("last.pt", "log.jsonl"))
    if args.resume:
        return resumable(args.out)
    if previous and not args.overwrite:
        raise SystemExit(f"error: --out {args.out} holds a previous run (last.pt / log.jsonl); "
                         "pass --resume to continue it or --overwrite to replace it")
    return []


def resumable(out):
    """The full checkpoints in ``out``, newest first: last.pt, its rotated predecessors
    last-1.pt, last-2.pt ... (--keep-last), then the stage checkpoints ckpt_<pct>.pt, which hold
    everything last.pt holds; by modification time, last.pt first when it exists."""
    if not os.path.isdir(out):
        return []
    names = [n for n in os.listdir(out)
             if n.endswith(".pt") and (n == "last.pt" or n.startswith(("last-", "ckpt_")))]
    paths = sorted((os.path.join(out, n) for n in names), key=os.path.getmtime, reverse=True)
    return sorted(paths, key=lambda p: os.path.basename(p) != "last.pt")     # stable


def read_resumable(paths, args, accel):
    """The newest of ``paths`` that reads, passes its checksum and holds a whole checkpoint:
    → (path, checkpoint). Every one skipped is named with what is wrong with it and set aside
    as ``<name>.bad`` (so that no later rotation keeps it in place of a good one); if none is
    good, the run stops rather than start from scratch over a run it cannot read, and touches
    nothing. One that would run code (UntrustedCheckpoint) stops the run too: not damage, but
    a file someone put there, and an older checkpoint beside it is no safer."""
    failures = []
    for path in paths:
        try:
            ckpt = load_checked(path, args.trust_checkpoint)
        except UntrustedCheckpoint as e:
            raise SystemExit(f"error: cannot resume: {e}") from None
        except BadCheckpoint as e:
            failures.append(f"{path}: {e}")
            print(f"warning: cannot resume from {path}: {e}"
                  + (f"; trying {paths[len(failures)]}" if len(failures) < len(paths) else ""),
                  flush=True)
            continue
        ckpt = check_settings(ckpt, path, args, accel)
        for bad in paths[:len(failures)]:
            os.replace(bad, bad + ".bad")
        if failures:
            print(f"note: set aside {len(failures)} damaged checkpoint(s) as *.bad", flush=True)
        return path, ckpt
    raise SystemExit("error: no readable checkpoint to resume from:\n  " + "\n  ".join(failures)
                     + "\nmove them away (or drop --resume and pass --overwrite) to start afresh")


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


def check_settings(ckpt, path, args, accel):
    """``ckpt`` if it was written by a run with these settings (it is read before any data,
    so a wrong --resume fails at once, naming the file and what differs)."""
    needed = ("args", "method", "optimizer", "state", "rng")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in needed):
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"error: {path} is not a checkpoint written by train.py (it holds "
                         f"{keys}; expected {', '.join(needed)})")
    saved = ckpt["args"]
    changed = [f"{k}: {saved.get(k)!r} → {getattr(args, k)!r}" for k in FIXED_ARGS
               if k in saved and saved[k] != getattr(args, k)]   # (older runs lack newer flags)
    if accel is not None and "accel" in ckpt and ckpt["accel"] != accel.to_json():     # the schedule file was edited
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


# ============================================= backbones from ours and published checkpoints
def check_state_dict(model, state_dict):
    """Raise a ValueError listing every missing / unexpected key and shape mismatch, if any."""
    problems = state_dict_mismatch(model, state_dict, limit=200)   # a backbone: list them all
    if problems:
        raise ValueError("\n".join(
            [f"checkpoint does not match the model {model.config()} (missing: in the model, "
             "not in the checkpoint; unexpected: the other way round):", *problems,
             "  (check --model and --img-size: pos_embed holds (img_size/patch_size)²+1 rows)"]))


def load_backbone(path, model=None, img_size=None, branch="auto", trust=False):
    """(backbone, info) from one of our checkpoints or any checkpoint in the interop layout.

    Ours carry ``vit_config``, so the ViT is rebuilt from it and ``model`` / ``img_size`` are
    not needed. Others (timm, DINO, MoCo-v3) carry only weights: ``model`` (a preset name of
    vit.PRESETS, or a dict of ViT kwargs) builds the ViT, with ``img_size`` overriding the
    preset's. The load is strict: any mismatch raises, listing the offending keys and shapes.
    ``branch`` "auto" picks the weights the method's paper evaluates (DINO: the teacher).
    The file is read by ``load`` (UntrustedCheckpoint unless ``trust``, if it holds more than
    weights and plain types).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    try:
        ckpt = load(path, trust)
    except UntrustedCheckpoint:
        raise
    except Exception as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({err})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint dict (got {type(ckpt).__name__})")
    if branch == "auto":                 # DINO reports its teacher; MoCo-v3 its base encoder
        args = ckpt.get("args")
        method = (vars(args) if isinstance(args, argparse.Namespace) else args or {}).get("method")
        branch = "target" if method == "dino" or ("teacher" in ckpt and "student" in ckpt) \
            else "online"
    if "vit_config" in ckpt:                                          # written by train.py
        backbone = vit.ViT(**ckpt["vit_config"])
        try:
            sd = vit.run_backbone(ckpt, branch)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        fmt = "accel-ssl"
    else:
        if model is None:
            raise ValueError(f"{path} has no 'vit_config' (not written by train.py): give the "
                             f"architecture with --model ({', '.join(vit.PRESETS)}) and, if it "
                             "differs from the preset's, --img-size")
        cfg = dict(model) if isinstance(model, dict) else None
        if cfg is not None and img_size is not None:
            cfg["img_size"] = img_size
        overrides = {} if img_size is None else {"img_size": img_size}
        backbone = vit.ViT(**cfg) if cfg is not None else vit.build_vit(model, **overrides)
        sd = vit.backbone_state_dict(ckpt, branch)
        fmt = "interop"
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    check_state_dict(backbone, sd)
    backbone.load_state_dict(sd, strict=True)
    args = ckpt.get("args")
    info = dict(path=path, format=fmt, branch=branch, config=backbone.config(),
                args=vars(args) if isinstance(args, argparse.Namespace) else args)
    return backbone, info
