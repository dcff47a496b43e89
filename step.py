"""One step of §6: rates at progress, the views' forward, the loss, backward, clipping, the
optimiser step and the momentum encoder / teacher EMA.

Concern: what a single step does to the model and to the budget spent. How steps are
driven, checked, logged, saved and stopped is train.py's; the step's only link to that is
``watch_loss``, which marks a non-finite loss on the device for train.check_losses to read
without a host sync.
"""
import torch

import precision
from augment import to_model
from schedule import cosine_between, learning_rate


@torch.no_grad()
def clip_gradients(module, max_norm):
    """Scale each parameter's gradient to L2 norm ≤ max_norm, parameter by parameter, as DINO's
    utils.clip_gradients (not torch's clip_grad_norm_, which scales all by the global norm):
    g ← g · min(1, max_norm / (‖g‖ + 1e-6)). All norms in one fused pass and all factors in one
    (P,) vector, instead of ~5 small kernels per parameter (P ≈ 160 for DINO's ViT-S)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))                  # (P,) ‖g‖ per parameter
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)              # (P,)
    torch._foreach_mul_(grads, list(factors.unbind()))


def set_rates(run, progress):
    """Learning rate and (on the decayed group) weight decay at ``progress``; → (lr, wd)."""
    args = run.args
    lr = learning_rate(progress, run.peak_lr, args.warmup, args.lr_schedule, final_lr=args.min_lr)
    wd = cosine_between(progress, args.weight_decay, args.weight_decay_end)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
        if group["weight_decay"]:                   # the decayed group only
            group["weight_decay"] = wd
    return lr, wd


def train_step(run, state, batch):
    """One step of §6 on a batch of views; → (loss, statistics): the loss and the method's
    statistics stay on the device (read at the log interval), with the rates it used."""
    args, progress = run.args, state.spent / run.args.budget
    state.stage = run.accel.index(progress)                      # the strategy at progress
    strategy = run.resolve(run.accel.stages[state.stage][1])     # q, k and M views
    lr, wd = set_rates(run, progress)                            # lr, weight decay
    views = [to_model(v, run.device) for v in batch[:strategy.views]]     # normalised there
    with precision.autocast(run.device, run.precision):     # bf16, fp16 or none: by the card
        loss, stats = run.model(views, strategy.q, strategy.k, progress)    # forward
    watch_loss(run, state, loss, progress)          # a non-finite loss stops the run (below)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()               # backward (fp16: of the loss × its scale)
    run.scaler.unscale_(run.optimizer)              # fp16: the true gradients, for the clipping
    if args.clip_grad:
        clip_gradients(run.method, args.clip_grad)
    if args.method == "dino" and progress < args.freeze_last_layer:
        run.method.cancel_last_layer_gradients()
    run.scaler.step(run.optimizer)                  # AdamW (fp16: skipped if gradients overflowed)
    run.scaler.update()
    run.method.update_target(progress)              # momentum encoder / teacher EMA
    state.spent += state.prices[state.stage]        # every sample of every rank pays its price
    state.step += 1
    state.batch_in_epoch += 1
    state.images += args.batch_size
    return loss, {**stats, "lr": lr, "wd": wd}


def watch_loss(run, state, loss, progress):
    """Remember, on the device, the first non-finite loss since the last check: (1, step,
    progress, loss) in ``run.watch``. No host sync here; train.check_losses reads it."""
    value = loss.detach().float()
    first = (run.watch[0] == 0) & ~torch.isfinite(value)
    here = torch.stack([torch.ones_like(value), torch.full_like(value, state.step + 1),
                        torch.full_like(value, progress), value])
    run.watch.copy_(torch.where(first, here, run.watch))
