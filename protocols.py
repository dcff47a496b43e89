"""Evaluation protocols of the paper's tables: NN (weighted k-NN), LP (linear probe), FT (fine-tune).

Concern: turning a pre-trained backbone into the three numbers the paper reports for every
run (§6.1; its tables read "NN | LP | FT"), all on the class token after the final norm:

* **NN** — weighted k-NN of Wu et al. (2018) as run by DINO: cosine similarity to every
  training feature, the k = 20 nearest vote for their class with weight exp(sim / T), T = 0.07.
  No training at all, so it is also the cheap number train.py logs during pre-training.
* **LP** — a linear classifier on frozen features, extracted once and cached.
* **FT** — the whole backbone plus a linear head trained end to end.

The command line that runs them on a checkpoint is eval.py.
"""
import contextlib
import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from augment import normalize
from cluster import ignore_preemption_signals
from distributed import gather_no_grad, rank_world
from run import weight_decay_groups
from schedule import learning_rate


# ============================================================================== features
# Evaluation images travel as uint8 (data.EvalDataset) and are normalised where the backbone
# runs (augment.normalize), as training's views are: a quarter of float32's shared memory and
# host-to-device traffic. Where the images are already one tensor of the eval size (CIFAR's
# arrays, the embedded set, the resident training set), features are taken from it in slices,
# with no loader at all (``tensor_features``).

def feature_loader(dataset, batch_size, num_workers=0, device="cpu", shuffle=False, generator=None):
    """Workers ignore preemption signals, as training's do (cluster.py): train.py evaluates
    with them, and a worker killed by a job-wide SIGTERM would fail the evaluation."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
                      drop_last=shuffle and len(dataset) > batch_size,
                      worker_init_fn=ignore_preemption_signals)


def model_input(images, device):
    """A batch as the backbone takes it, on ``device``: uint8 images are normalised there
    (augment.normalize); float images are taken as already normalised."""
    images = images.to(device, non_blocking=True)
    return normalize(images) if images.dtype == torch.uint8 else images


def _autocast(device):
    """bf16 autocast on CUDA (as in training); full precision on CPU, where bf16 is slow."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract_features(backbone, batches, device):
    """Final-norm class tokens of every image of ``batches`` (a loader, or any iterable of
    (images, labels); uint8 images are normalised on ``device``): (feats (N, D) float32,
    labels (N,)).

    The backbone must already be on ``device``; the features stay there. Evaluation mode
    (no token dropout) for the pass; the backbone's training flag is restored afterwards, so
    train.py can call this in the middle of pre-training.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for images, y in batches:
            with _autocast(device):
                f = backbone(model_input(images, device))                  # (B, D)
            feats.append(f.float())
            labels.append(torch.as_tensor(y).to(device))
    finally:
        backbone.train(was_training)
    if not feats:                                   # an empty share (fewer images than ranks)
        return torch.zeros(0, backbone.dim, device=device), torch.zeros(0, dtype=torch.long,
                                                                        device=device)
    return torch.cat(feats), torch.cat(labels).long()


def tensor_features(backbone, images, labels, device, batch_size=256):
    """Features of uint8 images (N, 3, s, s) held as one tensor, on the host or already on
    ``device`` (the resident training set), in slices of ``batch_size``, no DataLoader:
    (feats (N, D) float32, labels (N,)) on ``device``."""
    return extract_features(backbone, ((images[i:i + batch_size], labels[i:i + batch_size])
                                       for i in range(0, len(images), batch_size)), device)


def dataset_features(backbone, dataset, device, batch_size=256, num_workers=0, rank=0, world=1,
                     pad=False):
    """Features of rank's ``shard`` of ``dataset``: from its images as one tensor where it has
    them (data.EvalDataset.as_tensors), else through a loader with ``num_workers`` processes."""
    tensors = dataset.as_tensors() if hasattr(dataset, "as_tensors") else None
    if tensors is None:
        return extract_features(backbone, feature_loader(shard(dataset, rank, world, pad),
                                                         batch_size, num_workers, device), device)
    index = torch.tensor(shard_index(len(dataset), rank, world, pad), dtype=torch.long)
    images, labels = tensors if world == 1 else (t[index] for t in tensors)
    return tensor_features(backbone, images, labels, device, batch_size)


# =================================================================================== k-NN
KNN_CHUNK_ENTRIES = 2 ** 26        # similarities held at once: 256 MB in float32


@torch.no_grad()
def knn_classify(train_feats, train_labels, test_feats, k=20, temperature=0.07, num_classes=None):
    """Weighted k-NN predictions (N_test,) for ``test_feats`` (Wu et al. 2018; DINO's eval_knn).

    For a test feature x, with s_i = cos(x, x_i) over the training features:
        N(x) = the k indices of largest s_i,   score(c) = Σ_{i ∈ N(x), y_i = c} exp(s_i / T)
    and the prediction is argmax_c score(c). The similarity matrix is built for a chunk of
    test rows at a time (at most KNN_CHUNK_ENTRIES entries), so memory stays bounded for
    ImageNet-sized banks.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train = F.normalize(train_feats.float(), dim=1)                 # (N, D), unit rows
    test = F.normalize(test_feats.float(), dim=1)                   # (M, D)
    train_labels = train_labels.to(train.device).long()
    C = int(train_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, train.shape[0])
    chunk = max(1, KNN_CHUNK_ENTRIES // train.shape[0])
    preds = []
    for start in range(0, test.shape[0], chunk):
        sims = test[start:start + chunk] @ train.T                   # (m, N) cosine similarities
        top_sims, top_idx = sims.topk(k, dim=1)                      # (m, k)
        weights = (top_sims / temperature).exp()                     # exp(s_i / T)
        votes = torch.zeros(top_idx.shape[0], C, device=train.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)        # (m, C) class scores
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def percent_correct(preds, labels):
    return 100.0 * (preds.cpu() == labels.cpu()).float().mean().item()


def knn_accuracy(backbone, train_set, val_set, device, k=20, temperature=0.07, batch_size=256,
                 num_workers=0):
    """NN top-1 (%) of ``backbone`` (on ``device``): datasets give (image, label), uint8 images
    (data.EvalDataset) or already normalised floats; from the datasets' tensors where they have
    them (``dataset_features``).

    Under several processes (train.py's evaluations), every rank extracts the features of its
    share of both sets with ``num_workers`` loader processes; the bank's are gathered so that
    every rank holds all of them, in order, and each rank classifies its share of the
    validation images: one process's accuracy, in 1/W of its time, with no rank idle."""
    rank, world = rank_world()
    train_feats, train_labels = dataset_features(backbone, train_set, device, batch_size,
                                                 num_workers, rank, world, pad=True)
    train_feats, train_labels = (unshard(x, len(train_set)) for x in (train_feats, train_labels))
    val_feats, val_labels = dataset_features(backbone, val_set, device, batch_size, num_workers,
                                             rank, world)
    preds = knn_classify(train_feats, train_labels, val_feats, k, temperature,
                         num_classes=_num_classes(train_set, train_labels)) if len(val_feats) \
        else val_labels                                       # an empty share (more ranks)
    counts = torch.stack([(preds == val_labels).sum(), torch.tensor(len(val_labels))
                          .to(preds.device)]).double()           # (correct, seen) on this rank
    if world > 1:
        dist.all_reduce(counts)
    return 100.0 * float(counts[0] / counts[1])


def shard_index(n, rank, world, pad=False):
    """Rank r's share of n items: r, r+W, r+2W, ... With ``pad``, every share has ⌈n/W⌉ items
    (the last item repeated), as an all-gather needs equal sizes."""
    index = list(range(rank, n, world))
    return index + [n - 1] * (math.ceil(n / world) - len(index)) if pad else index


def shard(dataset, rank, world, pad=False):
    """Rank r's share of ``dataset`` (``shard_index``), as a Subset."""
    return dataset if world == 1 else Subset(dataset, shard_index(len(dataset), rank, world, pad))


def unshard(rows, n):
    """The rows of every rank's padded ``shard`` back in the dataset's order: (n, ...)."""
    world = rank_world()[1]
    if world == 1:
        return rows
    gathered = gather_no_grad(rows)                                  # (W·m, ...), rank-major
    m = rows.shape[0]
    return gathered.reshape(world, m, *rows.shape[1:]).transpose(0, 1).reshape(
        world * m, *rows.shape[1:])[:n]                              # item j·W + r at j·W + r


def raw_pixel_knn(train_set, val_set, k=20, temperature=0.07):
    """The same k-NN on flattened normalised pixels: what needs no learning at all.

    The bar a learned representation has to clear: on the embedded dataset the nuisances
    (position, size, colour, background) dominate pixel space, so it stays far below what
    augmentation-invariant features reach. Holds N × 3·H·W floats: meant for small images."""
    def pixels(ds):
        xs, ys = zip(*[(model_input(x, "cpu").flatten(1), torch.as_tensor(y))
                       for x, y in feature_loader(ds, 512)])
        return torch.cat(xs).float(), torch.cat(ys).long()            # (N, 3·H·W), (N,)
    (xtr, ytr), (xva, yva) = pixels(train_set), pixels(val_set)
    preds = knn_classify(xtr, ytr, xva, k, temperature, num_classes=_num_classes(train_set, ytr))
    return percent_correct(preds, yva)


def _num_classes(dataset, labels):
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else int(labels.max()) + 1


# ========================================================================== linear probe
# The probe is a convex problem on CACHED features, so it costs seconds even for ImageNet-100.
# Choices (DINO and MoCo-v3 probe with SGD + cosine LR and sweep the learning rate):
# * features are standardised with the training set's mean and std, where MAE puts a
#   BatchNorm without affine in front of the layer: the same normalisation, but with fixed
#   statistics, so the probe is a plain convex problem and deterministic;
# * zero-initialised weights, SGD momentum 0.9, no weight decay, batch 256, cosine LR;
# * the LR is chosen on a held-out 10 % of the training set from PROBE_LRS, then the probe is
#   retrained on all of it with that LR. Only the final run ever sees the validation set.
PROBE_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)


def _train_linear(x, y, num_classes, epochs, lr, weight_decay, batch_size, seed):
    """SGD + cosine on (x, y); returns the trained layer. Shuffling drawn from ``seed`` only."""
    layer = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(x), generator=g).to(x.device)
        idx = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        for group in opt.param_groups:                                # cosine from lr to 0
            group["lr"] = learning_rate(step / total, lr, warmup=0.0)
        loss = F.cross_entropy(layer(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return layer


def _standardise(train_feats, *others):
    mean, std = train_feats.mean(0), train_feats.std(0).clamp_min(1e-6)   # (D,), (D,)
    return [(f - mean) / std for f in (train_feats, *others)]


@torch.no_grad()
def _probe_accuracy(layer, x, y):
    return percent_correct(layer(x).argmax(1), y)


def select_probe_lr(train_feats, train_labels, lrs=PROBE_LRS, epochs=100, weight_decay=0.0,
                    batch_size=256, seed=0, holdout=0.1):
    """(best lr, {lr: held-out top-1 %}): each lr trained on 90 % of train, scored on 10 %."""
    train_feats, train_labels = train_feats.float(), train_labels.long()
    n = len(train_feats)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(train_feats.device)
    n_hold = max(1, int(holdout * n))
    hold, fit = perm[:n_hold], perm[n_hold:]
    C = int(train_labels.max()) + 1
    x_fit, x_hold = _standardise(train_feats[fit], train_feats[hold])
    with torch.enable_grad():
        scores = {lr: _probe_accuracy(_train_linear(x_fit, train_labels[fit], C, epochs, lr,
                                                    weight_decay, batch_size, seed),
                                      x_hold, train_labels[hold]) for lr in lrs}
    return max(scores, key=scores.get), scores      # ties go to the first (smallest) lr


def linear_probe(train_feats, train_labels, val_feats, val_labels, epochs=100, lr=None,
                 weight_decay=0.0, batch_size=256, seed=0, num_classes=None):
    """LP top-1 (%) of a linear layer on frozen, standardised features; deterministic given seed.

    ``lr=None`` sweeps PROBE_LRS on a held-out part of the training set (select_probe_lr)."""
    train_labels, val_labels = train_labels.long(), val_labels.long()
    if lr is None:
        lr, _ = select_probe_lr(train_feats, train_labels, epochs=epochs,
                                weight_decay=weight_decay, batch_size=batch_size, seed=seed)
    C = int(max(train_labels.max(), val_labels.max())) + 1 if num_classes is None else num_classes
    x_train, x_val = _standardise(train_feats.float(), val_feats.float())
    with torch.enable_grad():
        layer = _train_linear(x_train, train_labels, C, epochs, lr, weight_decay, batch_size, seed)
    return _probe_accuracy(layer, x_val, val_labels)


# ============================================================================ fine-tuning
def _augment(x, g):
    """Random crop (reflect-pad by 1/8 of the side, crop back) and horizontal flip, per sample."""
    B, _, H, W = x.shape                                             # normalised (B, 3, H, W)
    pad = max(1, H // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")          # (B, 3, H+2p, W+2p)
    top = torch.randint(0, 2 * pad + 1, (B,), generator=g).tolist()
    left = torch.randint(0, 2 * pad + 1, (B,), generator=g).tolist()
    flip = (torch.rand(B, generator=g) < 0.5).tolist()
    out = [padded[b, :, top[b]:top[b] + H, left[b]:left[b] + W] for b in range(B)]
    return torch.stack([o.flip(-1) if f else o for o, f in zip(out, flip)])


def finetune(backbone, train_set, val_set, num_classes, device, epochs=10, lr=5e-4, batch_size=128,
             weight_decay=0.05, augment=True, warmup_epochs=1, seed=0, num_workers=0):
    """FT top-1 (%): a copy of ``backbone`` + a linear head, trained end to end; the original
    backbone is untouched.

    Recipe (a short DeiT / MAE-style one, without mixup, drop-path or layer-wise LR decay):
    AdamW, linear warm-up for ``warmup_epochs`` then cosine to 0, weight decay on matrices only
    (not on biases, norms, the class token or position embedding), bf16 autocast on CUDA.
    The number reported is the validation top-1 after the last epoch (no early stopping on the
    validation set)."""
    encoder = copy.deepcopy(backbone).to(device).train()
    head = nn.Linear(encoder.dim, num_classes).to(device)
    nn.init.zeros_(head.weight)                # zero head: the first steps do not disturb the
    nn.init.zeros_(head.bias)                  # pre-trained features with random gradients
    decay, no_decay = weight_decay_groups(nn.ModuleDict(dict(encoder=encoder, head=head)),
                                          exempt_1d=True, exempt_tokens=True)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    g = torch.Generator().manual_seed(seed)
    loader = feature_loader(train_set, batch_size, num_workers, device, shuffle=True, generator=g)
    total, warm = epochs * len(loader), warmup_epochs * len(loader)
    step = 0
    for _ in range(epochs):
        for images, labels in loader:
            for group in opt.param_groups:                  # warm-up, then cosine to 0
                group["lr"] = learning_rate((step + 1) / total, lr, warmup=warm / total)
            images, labels = model_input(images, device), torch.as_tensor(labels).to(device)
            if augment:
                images = _augment(images, g)
            with _autocast(device):
                loss = F.cross_entropy(head(encoder(images)).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    feats, labels = dataset_features(encoder, val_set, device, batch_size, num_workers)
    with torch.no_grad():
        return percent_correct(head(feats).argmax(1), labels)
