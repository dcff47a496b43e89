"""What a run is made of, built once from its flags: backbone, method, strategies, data, optimiser.

Concern: construction. ``build_run(args)`` turns train.py's parsed flags — or the flags saved
in a checkpoint — into one ``Run``; train.py trains it, probe.py measures gradients on it,
and nothing else builds these parts. Every problem with the flags raises ``BadRun`` with a
message naming the value and what is allowed (train.py turns it into a usage error).

The order of construction is the order in which the parts draw from the seeded RNG (the
backbone's initialisation, MoCo-v3's frozen patch projection, the heads), so a run built
twice from the same flags starts from the same weights.

    args, _ = options.get_args(["--method", "moco", "--accel", "q:drop=0.75"])
    run = build_run(args)                      # on CPU, one process
    views, _ = next(iter(run.loader))          # run.views views per sample
    strategy = run.accel.at(0.0).resolve(args.views)
"""
import dataclasses

import torch
from torch.nn.parallel import DistributedDataParallel

import augment
import compress
import data
import methods
import precision
import resident
import vit
from schedule import StageSchedule, parse_grid


class BadRun(ValueError):
    """A flag (or a file it names) that cannot make a run; the message says which and why."""


@dataclasses.dataclass
class Run:
    args: object                  # the parsed flags (argparse.Namespace)
    device: torch.device
    rank: int
    world: int
    backbone: vit.ViT
    method: torch.nn.Module       # backbone + heads + loss (+ momentum encoder / teacher)
    method_kwargs: dict           # its head sizes and hyper-parameters (saved in checkpoints)
    accel: StageSchedule          # the strategies by progress as given (auto: none yet)
    grid: list                    # --accel auto: the strategies it probes
    views: int                    # views per sample in a batch: the most any strategy uses
    recipes: list                 # augment.ViewRecipe of each of those views
    local_size: int | None        # DINO's local-crop size (None without local crops)
    train_base: object            # the training images (uint8, label)
    cost: compress.CostModel
    # ---- training only (build_run(..., train=True)) ----
    model: torch.nn.Module = None       # method, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer = None
    peak_lr: float = None
    sampler: data.ResumableSampler = None
    loader: object = None               # yields ([views], labels): data or resident.ResidentLoader
    data_path: str = None               # "resident" or "workers" (--data-path, resolved)
    knn_sets: tuple = None              # (bank, val) EvalDatasets
    precision: str = "fp32"             # the step's: bf16 | fp16 | fp32 (precision.py)
    scaler: torch.amp.GradScaler = None     # fp16's loss scale (a passthrough otherwise)
    watch: torch.Tensor = None          # the first non-finite loss, noted on the device

    @property
    def master(self):
        return self.rank == 0

    @property
    def evaluated(self):
        """The weights each method reports: DINO's teacher (its paper evaluates the teacher,
        better than the student throughout training), the online backbone otherwise."""
        return self.method.teacher.backbone if self.args.method == "dino" else self.backbone

    def resolve(self, strategy):
        """The views rule for this run (compress.Strategy.resolve at its --views)."""
        return strategy.resolve(self.args.views)

    def label(self, strategy):
        """A strategy as the log shows it: with its number of views only where batches carry
        more views than the run's own (a stage may then use fewer than the batch holds)."""
        return str(self.resolve(strategy) if self.views != self.args.views else strategy)

    def price(self, strategy):
        """Units of one sample under ``strategy`` (compress.CostModel). Timing (--cost
        measured) runs token dropout, so it must not draw from the training RNG."""
        with torch.random.fork_rng(devices=[]):
            return self.cost.sample_units(self.args.method, self.resolve(strategy),
                                          local_size=self.local_size,
                                          symmetric=self.args.symmetric)

    def view_set(self, colour_on="loader"):
        """The training images seen through the run's view recipes (the loader's; probe draws)."""
        return data.ViewDataset(self.train_base, self.recipes, seed=self.args.seed,
                                colour_on=colour_on)

    @property
    def colour_on(self):
        """Where the training loader leaves augmentation's colour ops (--augment-on)."""
        if self.args.augment_on == "auto":
            return "device" if self.device.type == "cuda" else "loader"
        return self.args.augment_on


# ======================================================================== the parts
def build_backbone(args):
    overrides = {k: v for k, v in (("img_size", args.img_size), ("patch_size", args.patch_size)) if v}
    if args.pos_embed != "learned":
        overrides["pos_embed"] = args.pos_embed
    try:
        return vit.build_vit(args.model, **overrides)
    except (ValueError, RuntimeError) as e:
        raise BadRun(str(e)) from None


def build_strategies(args, backbone):
    """(stage schedule, auto grid, views per batch), each strategy checked against the image."""
    auto, p0 = args.accel == "auto", backbone.patch_size
    try:
        accel = StageSchedule([(0.0, compress.NONE)]) if auto else StageSchedule.parse(args.accel)
        grid = parse_grid(args.auto_grid or f"drop=0,0.5,0.75 patch={p0},{2 * p0}", p0) \
            if auto else []
    except (ValueError, FileNotFoundError) as e:
        raise BadRun(str(e)) from None
    flag = f"--auto-grid {args.auto_grid!r}" if auto else f"--accel {args.accel!r}"
    strategies = [s for _, s in accel.stages] + grid
    for strategy in strategies:                      # fail now, not hours into the run
        for vc in (strategy.q, strategy.k):
            if vc.patch_size and vc.patch_size > backbone.img_size:
                raise BadRun(f"{flag}: patch {vc.patch_size} is larger than the "
                             f"{backbone.img_size}-px image")
    views = max(strategy.resolve(args.views).views for strategy in strategies)
    return accel, grid, views


def view_recipes(args, img_size, views):
    """Recipes for batches of ``views`` views: the run's own views (DINO: its global crops,
    whose scale depends on whether the run has local crops), then as many more as the
    strategies need (DINO: more local crops)."""
    settings = augment.recipe_settings(args)
    local = compress.local_crops(args.method, views)
    if args.method == "dino":
        own = augment.build_views("dino", img_size, local_crops=args.local_crops, **settings)
        more = augment.build_views("dino", img_size, local_crops=local, **settings)
        return own[:2] + more[2:]
    return augment.build_views(args.method, img_size, views=views, **settings)


def build_dataset(args, split, img_size, size):
    try:
        return data.build_dataset(args.data, args.data_root, split, img_size, args.download,
                                  seed=args.seed, size=size, cache=args.data_cache)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise BadRun(str(e)) from None


def build_method(args, backbone, device):
    if args.stop_grad_conv1:              # MoCo-v3: a random, frozen patch projection
        backbone.freeze_patch_embed()
    try:
        kwargs = methods.method_kwargs(args, backbone.dim)
    except ValueError as e:
        raise BadRun(str(e)) from None
    return methods.build_method(args.method, backbone, **kwargs).to(device), kwargs


def weight_decay_groups(module, exempt_1d, exempt_tokens=False):
    """(decayed, exempt) trainable parameters of ``module``, as each official code groups them.

    DINO (utils.get_params_groups) exempts biases and every 1-D parameter (norms), and decays
    the class token and position embedding: ``exempt_1d=True``. MoCo-v3 passes every
    parameter to AdamW with its weight decay, norms and biases included; SimCLR and the
    multi-view method follow it: ``exempt_1d=False``. Fine-tuning (protocols.py, DeiT / MAE) also
    exempts the class token and position embedding: ``exempt_tokens=True``.
    """
    decay, exempt = [], []
    for key, p in module.named_parameters():
        if p.requires_grad:
            token = key.rsplit(".", 1)[-1] in ("cls_token", "pos_embed")
            skip = (exempt_1d and p.ndim == 1) or (exempt_tokens and token)
            (exempt if skip else decay).append(p)
    return decay, exempt


def build_optimizer(args, method):
    """AdamW on the two weight-decay groups at the linearly scaled peak rate; → (opt, peak)."""
    decay, exempt = weight_decay_groups(method, exempt_1d=args.method == "dino")
    peak_lr = args.lr * args.batch_size / 256                       # linear scaling rule
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": exempt, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]         # MoCo-v3 has no exempt group
    # Fused AdamW: one kernel for all parameters instead of a dozen elementwise passes; on CPU
    # it needs torch ≥ 2.4 and is a third of the foreach step (bench.py --section adamw).
    try:
        return torch.optim.AdamW(groups, lr=peak_lr, fused=True), peak_lr
    except RuntimeError:                # older torch on CPU: the foreach implementation
        return torch.optim.AdamW(groups, lr=peak_lr), peak_lr


def build_views_loader(run, path):
    """run.loader and run.data_path for --data-path ``path``: resident (the images on the device,
    views made there: resident.py), workers (loader processes make the views), or auto:
    resident wherever the images are one array that fits, else workers, saying why."""
    args, cuda = run.args, run.device.type == "cuda"
    if path == "auto" and not cuda and _large_images(run.train_base):
        path = "workers"          # on a CPU the loader makes their views as fast (docs/speed.md)
        if run.master:
            print(f"note: views are made by loader workers: on a CPU, images above "
                  f"{resident.MATMUL_MAX_SIDE} px gain nothing from --data-path resident",
                  flush=True)
    if path != "workers":
        try:
            images = resident.place(run.train_base, run.device)
        except resident.NotResident as e:
            if path == "resident":
                raise BadRun(f"--data-path resident: {e}") from None
            if run.master:
                print(f"note: views are made by loader workers: {e}", flush=True)
        else:
            run.loader = resident.build_resident_loader(images, run.recipes, run.sampler.batch_size,
                                                        run.sampler, args.seed, args.workers)
            run.data_path = "resident"
            return
    run.loader, run.data_path = data.build_loader(run.view_set(run.colour_on),
                                                  run.sampler.batch_size, run.sampler,
                                                  num_workers=args.workers, pin_memory=cuda), \
        "workers"


def _large_images(base):
    """Whether ``base`` is one array of images above resident.MATMUL_MAX_SIDE px: those the
    resident path crops image by image on a CPU, as the loader does (an image folder: False,
    resident.place says why it is not resident)."""
    try:
        return max(resident.array_shape(base)[-2:]) > resident.MATMUL_MAX_SIDE
    except resident.NotResident:
        return False


# ========================================================================= the run
def build_run(args, device=torch.device("cpu"), rank=0, world=1, train=True):
    """Everything a run needs, in the order the seeded RNG is drawn (module docstring).
    ``train=False`` stops before the loader, the k-NN sets and the optimiser (the probe's
    CLI needs the method, the strategies, the images and the cost model only)."""
    backbone = build_backbone(args)
    accel, grid, views = build_strategies(args, backbone)
    train_base = build_dataset(args, "train", backbone.img_size, args.data_size)
    method, method_kwargs = build_method(args, backbone, device)
    recipes = view_recipes(args, backbone.img_size, views)
    local_size = recipes[-1].size if compress.local_crops(args.method, views) else None
    step_precision = precision.device_precision(device)       # by the card, not by emulation
    precision.use_tf32(step_precision)                        # the float32 islands' matmuls
    # --cost measured times what a step runs: this rank's batch, in the step's precision
    cost = compress.CostModel(backbone, args.cost, heads=method.cost_heads(),
                              batch=args.batch_size // world,
                              dtype=precision.DTYPES[step_precision])
    run = Run(args, device, rank, world, backbone, method, method_kwargs, accel, grid, views,
              recipes, local_size, train_base, cost, precision=step_precision)
    if train:
        build_training(run)
    return run


def build_training(run):
    """The loader over this rank's share, the k-NN sets, the optimiser and DDP."""
    args, per_rank = run.args, run.args.batch_size // run.world
    try:
        run.sampler = data.ResumableSampler(len(run.train_base), per_rank, seed=args.seed,
                                            rank=run.rank, world_size=run.world)
    except ValueError as e:
        raise BadRun(str(e)) from None
    build_views_loader(run, args.data_path)
    # With a --knn-bank, the bank and the validation images come from the whole splits, so a
    # run pretrained on --data-size of the training split is measured on the same images as
    # every other run of a comparison; without one (quick runs), a quarter as many val images.
    whole = bool(args.knn_bank and args.data_size)
    val_size = max(args.data_size // 4, 20) if args.data_size and not whole else None
    val = build_dataset(args, "val", run.backbone.img_size, val_size)  # every rank: knn_accuracy
    bank = build_dataset(args, "train", run.backbone.img_size, None) if whole else run.train_base
    run.knn_sets = (data.EvalDataset(bank, run.backbone.img_size, subset=args.knn_bank),
                    data.EvalDataset(val, run.backbone.img_size))
    run.optimizer, run.peak_lr = build_optimizer(args, run.method)
    run.scaler = precision.loss_scaler(run.device, run.precision)
    run.watch = torch.zeros(4, device=run.device)          # step.watch_loss
    run.model = run.method
    if run.world > 1:
        # Buffers (BN running stats, DINO centre) are computed from global-batch statistics
        # and are therefore identical on every rank: no need to broadcast them each step.
        run.model = DistributedDataParallel(
            run.method, device_ids=[run.device.index] if run.device.type == "cuda" else None,
            broadcast_buffers=False)
