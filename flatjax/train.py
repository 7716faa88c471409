"""Training to a train-accuracy target (plain SGD by default), many members per compiled program.

A *member* is one training run: a seed plus per-member hyperparameters (the learning rate, and any
extra ones its `Optimizer` reads, such as SAM's rho). All members of one call share the model,
the batch size and the data, so one compiled program trains them together under `vmap`.

Protocol (the paper's reference code):
- Mean cross-entropy over the minibatch; plain SGD (no momentum, no weight decay, constant LR).
- One epoch is one `lax.scan` over a fresh on-device permutation of the train set. With
  `drop_last=True` (the default) an epoch takes floor(N / B) full batches and skips the N mod B
  examples left at the end of the permutation; as every epoch reshuffles, every example is still
  seen over the epochs, and every step has the same shape. The reference (a PyTorch DataLoader)
  keeps the last partial batch; `drop_last=False` does the same, as one extra, smaller step.
- After every epoch: loss and accuracy in eval mode on the full train set. A member stops as
  `converged` at the first epoch whose train accuracy is at least `target_acc`, as `diverged` when
  the epoch's mean minibatch loss, the eval train loss or any parameter is non-finite, or when the
  eval train loss exceeds `divergence_factor` times its value at initialization, and as
  `not_converged` when it reaches `max_epochs` otherwise.
- A member that has stopped is frozen: inside the compiled epoch every leaf of its state is kept
  (`jnp.where(active, new, old)`) while the others go on, so its result equals that member trained
  alone.

Randomness: seed -> root = PRNGKey(seed); the init key is fold_in(root, 0) and the data key
fold_in(root, 1). Each epoch splits the data key into (next data key, permutation key, dropout
key); step i of the epoch uses fold_in(dropout key, i).

Optimizer seam: an `Optimizer` holds `make(hparams)`, which returns an
`optax.GradientTransformationExtraArgs`, and two BatchNorm rules. The step computes the clean
minibatch gradient, then calls `tx.update(grads, opt_state, params, grad_fn=grad_fn, batch=batch)`,
where `grad_fn(params, batch) -> (grads, new_batch_stats)` is a train-mode pass with the step's
dropout key whose BatchNorm statistics start from `pass_stats(stats before the step, stats after
the clean pass)`; the step keeps `kept_stats(stats after the clean pass, new opt_state)`. The
default (`SGD`) never calls `grad_fn` and keeps the clean pass's statistics. SAM plugs in as
`Optimizer(make=<sam around make_optimizer, with aux_like the batch_stats structure>,
pass_stats=partial(perturbed_pass_stats, policy), kept_stats=partial(sam_batch_stats, policy))`.

lambda_max tracking (`tracking=Tracking(every=k, ...)`): after every global optimizer step that
is a multiple of k (steps counted from the start of training, the partial step included when
`drop_last=False`), inside the epoch's scan, each member measures `hessian.lambda_max` of its
weights on a fixed strided subset of the training set (the paper's protocol, with chunks of the
training batch size), started from its previous eigenvector, so a measurement costs a few HVPs
after the first (a cold start). The step is a `lax.cond` whose predicate comes from the epoch
number the host loop passes unbatched (all members of a call train in lockstep), so under `vmap`
it stays a conditional and the steps between measurements pay nothing. Tracking off adds nothing
to the program.

Checkpoints: `TrainState` holds everything a run needs to continue (variables, optimizer state,
hyperparameters, RNG keys, epochs, stop masks, status, history, the tracker), as arrays with a
leading member axis; `train(..., state=saved)` continues from it and gives the same result as a
run that was never interrupted. `callback(state, metrics)` is called after every epoch, e.g. to
save it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from flatjax import hessian, parallel
from flatjax.data import strided_subset
from flatjax.losses import chunked_mean, cross_entropy

RUNNING, CONVERGED, NOT_CONVERGED, DIVERGED = 0, 1, 2, 3
STATUS_NAMES = ("running", "converged", "not_converged", "diverged")

Hyperparams = Mapping[str, jax.Array]
OptimizerFactory = Callable[[Hyperparams], optax.GradientTransformationExtraArgs]


@dataclasses.dataclass(frozen=True)
class Tracking:
    """lambda_max measured every `every` optimizer steps during training (module docstring).

    During a measurement every member of the call holds a Krylov basis of `num_iters` vectors of
    the size of its params (hessian.top_eigenvalue), whatever the HVPs a warm start needs.

    Attributes:
      every: steps between measurements (the first is after step `every`).
      subset_size: the strided training subset measured (None: the whole training set).
      num_iters, tol: the Lanczos cap and tolerance (None: the solver's default).
      batch_norm: BatchNorm mode of the measured loss, "train" or "eval" (hessian.model_loss).
    """

    every: int
    subset_size: int | None = 1000
    num_iters: int = 100
    tol: float | None = None
    batch_norm: str = "train"

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"tracking every must be at least 1 step, got {self.every}")
        if self.subset_size is not None and self.subset_size < 1:
            raise ValueError(f"tracking subset_size must be positive, got {self.subset_size}")
        if self.num_iters < 1:
            raise ValueError(f"tracking num_iters must be positive, got {self.num_iters}")
        if self.tol is not None and not self.tol >= 0:
            raise ValueError(f"tracking tol must be >= 0, got {self.tol}")
        if self.batch_norm not in hessian.BATCH_NORM_MODES:
            raise ValueError(f"tracking batch_norm must be one of {hessian.BATCH_NORM_MODES}, "
                             f"got {self.batch_norm!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What every member of one call shares: batch size, stop rule, evaluation chunking and
    lambda_max tracking (None: off)."""

    batch_size: int
    max_epochs: int
    target_acc: float = 0.99
    divergence_factor: float = 1e3
    eval_batch_size: int = 1000
    drop_last: bool = True
    tracking: Tracking | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, got {self.max_epochs}")
        if not 0.0 < self.target_acc <= 1.0:
            raise ValueError(f"target_acc must be in (0, 1], got {self.target_acc}")
        if not self.divergence_factor > 1.0:
            raise ValueError(f"divergence_factor must exceed 1, got {self.divergence_factor}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be positive, got {self.eval_batch_size}")


class Batch(NamedTuple):
    """A minibatch: inputs (B, ...) and integer labels (B,)."""

    x: jax.Array
    y: jax.Array


class EpochMetrics(NamedTuple):
    """One epoch's mean train-mode minibatch loss, and eval-mode train-set loss and accuracy."""

    minibatch_loss: jax.Array
    train_loss: jax.Array
    train_acc: jax.Array


class Tracker(NamedTuple):
    """A member's tracked lambda_max: its last eigenvector and one entry per measurement.

    `eigenvector` is like params (zeros before the first measurement, which therefore starts
    cold); measurement j is taken after global step (j + 1) * every, and `eigenvalue`,
    `num_hvps` and `converged` hold NaN, 0 and False after the last one taken.
    """

    eigenvector: Any
    eigenvalue: jax.Array
    num_hvps: jax.Array
    converged: jax.Array


class TrainState(NamedTuple):
    """Everything a run needs to continue; in `train` every leaf has a leading member axis.

    Fields: `params`, `batch_stats` (empty dict without BatchNorm), `opt_state`, `hparams` (dict
    of per-member scalars, at least "lr"), `seed`, `key` (data-order and dropout key of the next
    epoch), `epoch` (epochs trained), `active` (still training), `status` (a code indexing
    STATUS_NAMES), `init_loss` (eval train loss at initialization, the divergence reference),
    `history` (EpochMetrics of arrays (max_epochs,), NaN after the last epoch trained) and
    `tracker` (a `Tracker`; None when tracking is off).
    """

    params: Any
    batch_stats: Any
    opt_state: Any
    hparams: Any
    seed: jax.Array
    key: jax.Array
    epoch: jax.Array
    active: jax.Array
    status: jax.Array
    init_loss: jax.Array
    history: EpochMetrics
    tracker: Tracker | None = None


class Trajectory(NamedTuple):
    """Tracked lambda_max of every member, on the host.

    `step` and `epoch` (M,): the global step of each measurement and the epoch (from 1) it was
    taken in; `eigenvalue`, `num_hvps`, `converged` (members, M); `count` (members,): how many
    measurements each member took (its later entries are unused).
    """

    step: np.ndarray
    epoch: np.ndarray
    eigenvalue: np.ndarray
    num_hvps: np.ndarray
    converged: np.ndarray
    count: np.ndarray


class TrainResult(NamedTuple):
    """Per-member outcome of `train`; arrays have a leading member axis."""

    variables: dict
    seeds: np.ndarray
    hparams: dict
    status: list
    epochs: np.ndarray
    train_loss: np.ndarray
    train_acc: np.ndarray
    test_loss: np.ndarray
    test_acc: np.ndarray
    history: EpochMetrics
    state: TrainState
    trajectory: Trajectory | None = None

    def member_variables(self, i: int) -> dict:
        """The variables (params and batch_stats) of member i, without the member axis."""
        return jax.tree.map(lambda a: a[i], self.variables)


def make_optimizer(hparams: Hyperparams) -> optax.GradientTransformationExtraArgs:
    """Plain SGD with the constant learning rate `hparams["lr"]` (accepts `grad_fn=`/`batch=`)."""
    return optax.with_extra_args_support(optax.sgd(hparams["lr"]))


def stats_before_step(batch_stats, clean_stats):
    """BatchNorm statistics as they were before the step."""
    del clean_stats
    return batch_stats


def stats_of_clean_pass(clean_stats, opt_state):
    """BatchNorm statistics as the step's clean pass left them."""
    del opt_state
    return clean_stats


class Optimizer(NamedTuple):
    """How members are optimized (see the module docstring).

    Attributes:
      make: a member's hyperparameters -> its transformation.
      pass_stats: (stats before the step, stats after the clean pass) -> the statistics each
        `grad_fn` pass starts from.
      kept_stats: (stats after the clean pass, new optimizer state) -> the statistics kept.
    """

    make: OptimizerFactory = make_optimizer
    pass_stats: Callable[[Any, Any], Any] = stats_before_step
    kept_stats: Callable[[Any, Any], Any] = stats_of_clean_pass


SGD = Optimizer()


def train_mode_loss(model, dropout_key):
    """`loss(params, batch, batch_stats) -> (mean loss, new batch_stats)` in train mode."""

    def loss(params, batch: Batch, batch_stats):
        logits, mutated = model.apply(
            {"params": params, "batch_stats": batch_stats},
            batch.x,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        return cross_entropy(logits, batch.y), mutated["batch_stats"]

    return loss


def train_step(
    model, optimizer: Optimizer, tx, params, batch_stats, opt_state, batch: Batch, dropout_key
):
    """One optimizer step on `batch`; returns (params, batch_stats, opt_state, minibatch loss)."""
    value_and_grad = jax.value_and_grad(train_mode_loss(model, dropout_key), has_aux=True)
    (loss, clean_stats), grads = value_and_grad(params, batch, batch_stats)
    start_stats = optimizer.pass_stats(batch_stats, clean_stats)

    def grad_fn(p, b):
        (_, new_stats), g = value_and_grad(p, b, start_stats)
        return g, new_stats

    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn, batch=batch)
    params = optax.apply_updates(params, updates)
    return params, optimizer.kept_stats(clean_stats, opt_state), opt_state, loss


def evaluate(model, params, batch_stats, x, y, chunk_size: int, mesh=None):
    """Eval-mode mean loss and accuracy over all of (x, y), in chunks of `chunk_size`.

    Under a `mesh` each chunk is split over its data axis (flatjax.parallel).
    """
    variables = {"params": params, "batch_stats": batch_stats}

    def metrics(xc, yc, _):
        xc, yc = parallel.split_examples((xc, yc), mesh)
        logits = model.apply(variables, xc, train=False)
        return cross_entropy(logits, yc), jnp.mean(logits.argmax(-1) == yc, dtype=jnp.float32)

    return chunked_mean(metrics, x, y, chunk_size)


def split_epoch_key(key):
    """(next epoch's key, permutation key, dropout key) from this epoch's key."""
    next_key, perm_key, dropout_key = jax.random.split(key, 3)
    return next_key, perm_key, dropout_key


def epoch_batches(perm_key, num_examples: int, batch_size: int):
    """This epoch's example order as (full batches (floor(N/B), B), leftover indices (N mod B,))."""
    perm = jax.random.permutation(perm_key, num_examples)
    num_full = num_examples // batch_size
    split = num_full * batch_size
    return perm[:split].reshape(num_full, batch_size), perm[split:]


def steps_per_epoch(num_examples: int, config: TrainConfig) -> int:
    """Optimizer steps in one epoch: the full batches, and the partial one unless drop_last."""
    full, rest = divmod(num_examples, config.batch_size)
    return full + int(rest > 0 and not config.drop_last)


def num_measurements(num_examples: int, config: TrainConfig) -> int:
    """Length of a tracker's history: measurements in max_epochs epochs (0 without tracking)."""
    if config.tracking is None:
        return 0
    return config.max_epochs * steps_per_epoch(num_examples, config) // config.tracking.every


def required_correct(target_acc: float, num_examples: int) -> int:
    """Fewest correct predictions whose accuracy reaches `target_acc`, as an integer count."""
    return math.ceil(round(target_acc * num_examples, 9))


def all_finite(tree) -> jax.Array:
    """Whether every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


def init_member(model, optimizer: Optimizer, config: TrainConfig, mesh, seed, hparams, x, y):
    """A member's state before the first epoch (one member, no member axis)."""
    root = jax.random.PRNGKey(seed)
    variables = model.init({"params": jax.random.fold_in(root, 0)}, x[:1], train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    init_loss, _ = evaluate(model, params, batch_stats, x, y, config.eval_batch_size, mesh)
    nan_history = jnp.full((config.max_epochs,), jnp.nan, jnp.float32)
    tracker = None
    if config.tracking is not None:
        m = num_measurements(x.shape[0], config)
        tracker = Tracker(jax.tree.map(jnp.zeros_like, params),
                          jnp.full((m,), jnp.nan, jnp.float32), jnp.zeros((m,), jnp.int32),
                          jnp.zeros((m,), bool))
    return TrainState(
        params=params,
        batch_stats=batch_stats,
        opt_state=optimizer.make(hparams).init(params),
        hparams=hparams,
        seed=jnp.asarray(seed, jnp.int32),
        key=jax.random.fold_in(root, 1),
        epoch=jnp.zeros((), jnp.int32),
        active=jnp.ones((), bool),
        status=jnp.asarray(RUNNING, jnp.int32),
        init_loss=init_loss,
        history=EpochMetrics(nan_history, nan_history, nan_history),
        tracker=tracker,
    )


def stop_status(config: TrainConfig, epoch, correct_enough, finite, train_loss, init_loss):
    """Status code after an epoch: diverged, converged, not_converged (out of epochs) or running."""
    diverged = ~finite | (train_loss > config.divergence_factor * init_loss)
    return jnp.select(
        [diverged, correct_enough, epoch >= config.max_epochs],
        [DIVERGED, CONVERGED, NOT_CONVERGED],
        RUNNING,
    ).astype(jnp.int32)


def track(model, config: TrainConfig, step, params, batch_stats, tracker: Tracker,
          subset) -> Tracker:
    """`tracker` after global step `step`, with a warm-started lambda_max when one is due.

    `step` must be the same for every member: it is the predicate of a `lax.cond`, which under
    `vmap` would run the measurement at every step if it were batched.
    """
    tracking = config.tracking
    if tracker.eigenvalue.shape[0] == 0:  # no measurement falls within max_epochs
        return tracker

    def measure(tracker):
        r = hessian.lambda_max(
            model, {"params": params, "batch_stats": batch_stats}, *subset,
            batch_size=config.batch_size, subset_size=None, batch_norm=tracking.batch_norm,
            num_iters=tracking.num_iters, tol=tracking.tol, init=tracker.eigenvector)
        j = step // tracking.every - 1
        return Tracker(r.eigenvector, tracker.eigenvalue.at[j].set(r.eigenvalue),
                       tracker.num_hvps.at[j].set(r.num_hvps),
                       tracker.converged.at[j].set(r.converged))

    return jax.lax.cond(step % tracking.every == 0, measure, lambda t: t, tracker)


def run_epoch(model, optimizer: Optimizer, config: TrainConfig, mesh, state: TrainState, x, y,
              epoch, subset):
    """One epoch of one member, then its evaluation and stop rule.

    A member that was not active keeps its state bitwise and gets NaN metrics. Under a `mesh`
    each minibatch is split over its data axis. `epoch` (shared by all members, unbatched) is
    the number of epochs the active members have trained and `subset` the (x, y) that tracking
    measures (None when off).
    """
    n = x.shape[0]
    tx = optimizer.make(state.hparams)
    next_key, perm_key, dropout_key = split_epoch_key(state.key)
    full, rest = epoch_batches(perm_key, n, config.batch_size)
    first_step = epoch * steps_per_epoch(n, config)

    def step(carry, inputs):
        i, idx = inputs
        params, stats, opt_state, tracker = carry
        params, stats, opt_state, loss = train_step(
            model, optimizer, tx, params, stats, opt_state,
            parallel.split_examples(Batch(x[idx], y[idx]), mesh),
            jax.random.fold_in(dropout_key, i)
        )
        if tracker is not None:
            tracker = track(model, config, first_step + i + 1, params, stats, tracker,
                            subset)
        return (params, stats, opt_state, tracker), loss

    carry = (state.params, state.batch_stats, state.opt_state, state.tracker)
    carry, losses = jax.lax.scan(step, carry, (jnp.arange(full.shape[0]), full))
    loss_sum, seen = losses.sum() * config.batch_size, full.size
    if rest.size and not config.drop_last:
        carry, rest_loss = step(carry, (full.shape[0], rest))
        loss_sum, seen = loss_sum + rest_loss * rest.size, seen + rest.size
    params, batch_stats, opt_state, tracker = carry

    train_loss, train_acc = evaluate(model, params, batch_stats, x, y, config.eval_batch_size,
                                     mesh)
    metrics = EpochMetrics(loss_sum / seen, train_loss, train_acc)
    epoch = state.epoch + 1
    finite = jnp.isfinite(metrics.minibatch_loss) & jnp.isfinite(train_loss) & all_finite(params)
    correct_enough = jnp.round(train_acc * n) >= required_correct(config.target_acc, n)
    status = stop_status(config, epoch, correct_enough, finite, train_loss, state.init_loss)
    history = jax.tree.map(lambda h, m: h.at[state.epoch].set(m), state.history, metrics)
    new = state._replace(
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        key=next_key,
        epoch=epoch,
        active=status == RUNNING,
        status=status,
        history=history,
        tracker=tracker,
    )
    kept = jax.tree.map(lambda a, b: jnp.where(state.active, a, b), new, state)
    return kept, jax.tree.map(lambda m: jnp.where(state.active, m, jnp.nan), metrics)


class Programs(NamedTuple):
    """The compiled, member-vmapped programs of one (model, optimizer, config)."""

    init: Callable
    epoch: Callable
    evaluate: Callable


@functools.lru_cache(maxsize=16)
def compile_programs(model, optimizer: Optimizer, config: TrainConfig, mesh=None) -> Programs:
    """Jitted programs over a leading member axis; data arguments are shared by all members.

    `epoch(state, x, y, epoch, subset)` takes the active members' epoch count and the tracked
    subset (see `run_epoch`).

    With a `mesh` (flatjax.parallel) the member axis is its seed axis and examples are split
    over its data axis; the inputs are expected placed by `parallel.place_members` / `place`.
    """
    def compile_members(fn, in_axes):
        return parallel.jit_members(parallel.vmap_members(fn, mesh, in_axes), mesh, in_axes)

    init = compile_members(
        functools.partial(init_member, model, optimizer, config, mesh), (0, 0, None, None))
    epoch = compile_members(
        functools.partial(run_epoch, model, optimizer, config, mesh), (0, None, None, None, None))
    evaluate_members = compile_members(
        lambda s, x, y: evaluate(model, s.params, s.batch_stats, x, y, config.eval_batch_size,
                                 mesh),
        (0, None, None))
    return Programs(init, epoch, evaluate_members)


def member_hparams(lrs: Sequence[float], extra: Mapping[str, Sequence[float]] | None, size: int):
    """Per-member hyperparameter arrays {"lr": (S,), ...}, validated."""
    hparams = {"lr": lrs, **(extra or {})}
    out = {}
    for name, values in hparams.items():
        values = np.asarray(values, np.float32)
        if values.shape != (size,):
            raise ValueError(f"{name} needs one value per member ({size}), got {values.shape}")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name} must be finite, got {values.tolist()}")
        out[name] = values
    if np.any(out["lr"] <= 0):
        raise ValueError(f"learning rates must be positive, got {out['lr'].tolist()}")
    return out


def member_seeds(seeds: Sequence[int]) -> np.ndarray:
    """Seeds as an int32 array, validated."""
    seeds = np.asarray(seeds)
    if seeds.ndim != 1 or seeds.size == 0 or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(f"seeds must be a non-empty list of integers, got {seeds.tolist()}")
    if np.any(seeds < 0) or np.any(seeds >= 2**31):
        raise ValueError(f"seeds must be in [0, 2**31), got {seeds.tolist()}")
    return seeds.astype(np.int32)


def check_resumable(state: TrainState, seeds: np.ndarray, hparams: dict, config: TrainConfig,
                    num_examples: int):
    """Raise unless `state` belongs to these members, this config and this many examples."""
    if not np.array_equal(np.asarray(state.seed), seeds):
        saved = np.asarray(state.seed).tolist()
        raise ValueError(f"state is for seeds {saved}, not {seeds.tolist()}")
    if set(state.hparams) != set(hparams):
        names = sorted(state.hparams)
        raise ValueError(f"state has hyperparameters {names}, not {sorted(hparams)}")
    for name, values in hparams.items():
        if not np.array_equal(np.asarray(state.hparams[name]), values):
            raise ValueError(f"state's {name} differs from the requested {values.tolist()}")
    if state.history.train_acc.shape[-1] != config.max_epochs:
        raise ValueError("state was made for a different max_epochs")
    if (state.tracker is None) != (config.tracking is None):
        raise ValueError(f"state was made with tracking {'off' if state.tracker is None else 'on'}")
    if (state.tracker is not None and state.tracker.eigenvalue.shape[-1]
            != num_measurements(num_examples, config)):
        raise ValueError("state was made for another tracking interval or training set size")


def train(
    model,
    data,
    *,
    batch_size: int,
    lrs: Sequence[float],
    seeds: Sequence[int],
    max_epochs: int,
    target_acc: float = 0.99,
    divergence_factor: float = 1e3,
    eval_batch_size: int = 1000,
    drop_last: bool = True,
    optimizer: Optimizer = SGD,
    hparams: Mapping[str, Sequence[float]] | None = None,
    tracking: Tracking | None = None,
    state: TrainState | None = None,
    callback: Callable[[TrainState, EpochMetrics], None] | None = None,
    progress: bool = True,
    desc: str = "train",
    mesh=None,
) -> TrainResult:
    """Train members (seeds[i], lrs[i], hparams[k][i]) of `model` on `data` until each stops.

    Args:
      model: a Flax module following the model contract (notes/CONTRACTS.md).
      data: has x_train, y_train, x_test, y_test arrays.
      batch_size, max_epochs, target_acc, divergence_factor, eval_batch_size, drop_last: see
        `TrainConfig` and the module docstring.
      lrs, seeds: one entry per member (same length).
      optimizer: an `Optimizer`; the default is plain SGD.
      hparams: extra per-member hyperparameters passed to `optimizer.make` (e.g. {"rho": [...]}).
      tracking: measure lambda_max during training (`Tracking`; module docstring); None: off.
      state: a `TrainState` of these members to continue from (e.g. a restored checkpoint).
      callback: called as callback(state, metrics) after every epoch.
      progress: show a tqdm bar (epoch, loss and train accuracy of the running members).
      desc: the bar's label.
      mesh: a (seed, data) `jax.sharding.Mesh` (flatjax.parallel) to shard members and batches
        over; None runs on the default device.

    Returns:
      TrainResult with final variables, status names, epochs, eval-mode train loss and accuracy,
      test loss and accuracy, per-epoch history, the final state and, with tracking, the
      trajectory.
    """
    config = TrainConfig(
        batch_size, max_epochs, target_acc, divergence_factor, eval_batch_size, drop_last, tracking
    )
    seeds = member_seeds(seeds)
    member_hp = member_hparams(lrs, hparams, seeds.size)
    if batch_size > len(data.x_train):
        raise ValueError(
            f"batch_size {batch_size} exceeds the {len(data.x_train)} training examples"
        )
    x, y = parallel.place((data.x_train, data.y_train), mesh, members=False)
    subset = None
    if tracking is not None:
        subset = parallel.place(
            strided_subset(data.x_train, data.y_train, tracking.subset_size or len(data.x_train)),
            mesh, members=False)
    programs = compile_programs(model, optimizer, config, mesh)
    if state is None:
        state = programs.init(*parallel.place_members((seeds, member_hp), seeds.size, mesh), x, y)
    else:
        check_resumable(state, seeds, member_hp, config, len(data.x_train))
        state = parallel.place_members(state, seeds.size, mesh)
    state = run_epochs(programs.epoch, state, x, y, subset, config, callback, progress, desc,
                       seeds.size)
    x_test, y_test = parallel.place((data.x_test, data.y_test), mesh, members=False)
    test_loss, test_acc = programs.evaluate(state, x_test, y_test)
    result = make_result(*parallel.first_members((state, test_loss, test_acc), seeds.size))
    if tracking is None:
        return result
    return result._replace(
        trajectory=trajectory(result.state, result.epochs, config, len(data.x_train)))


def run_epochs(epoch_program, state, x, y, subset, config, callback, progress, desc,
               num_members: int) -> TrainState:
    """The Python epoch loop: one compiled call per epoch until no member is active.

    Each call gets the epoch count of the active members (the largest of all) and the tracked
    `subset`. `state` may hold padding members after the first `num_members`
    (flatjax.parallel); the callback sees the first `num_members` only.
    """
    epoch = parallel.to_host(state.epoch)
    with tqdm(total=config.max_epochs, initial=int(np.max(epoch)),
              desc=desc, disable=not progress, leave=False) as bar:
        active = parallel.to_host(state.active)[:num_members]
        while bool(np.any(active)):
            state, metrics = epoch_program(state, x, y, int(np.max(epoch)), subset)
            epoch, loss, acc, now_active = parallel.to_host(
                (state.epoch, metrics.train_loss, metrics.train_acc, state.active))
            bar.update(int(np.max(epoch)) - bar.n)
            bar.set_postfix(
                loss=f"{np.mean(loss[:num_members][active]):.4g}",
                acc=f"{np.mean(acc[:num_members][active]):.4f}",
                running=f"{int(np.sum(now_active[:num_members]))}/{num_members}",
            )
            active = now_active[:num_members]
            if callback is not None:
                callback(*parallel.first_members((state, metrics), num_members))
    return state


def trajectory(state: TrainState, epochs: np.ndarray, config: TrainConfig,
               num_examples: int) -> Trajectory:
    """The host-side `Trajectory` of a final state whose members trained `epochs` epochs."""
    per_epoch = steps_per_epoch(num_examples, config)
    every = config.tracking.every
    step = every * np.arange(1, num_measurements(num_examples, config) + 1)
    eigenvalue, num_hvps, converged = parallel.to_host(
        (state.tracker.eigenvalue, state.tracker.num_hvps, state.tracker.converged))
    return Trajectory(step, -(-step // per_epoch), eigenvalue, num_hvps, converged,
                      np.asarray(epochs) * per_epoch // every)


def make_result(state: TrainState, test_loss, test_acc) -> TrainResult:
    """Collect a final state and test metrics into host-side per-member results."""
    epochs, seeds, hparams, status, history, test_loss, test_acc = parallel.to_host(
        (state.epoch, state.seed, state.hparams, state.status, state.history, test_loss, test_acc))
    last = np.maximum(epochs - 1, 0)
    history = EpochMetrics(*history)
    members = np.arange(epochs.size)
    return TrainResult(
        variables={"params": state.params, "batch_stats": state.batch_stats},
        seeds=seeds,
        hparams=dict(hparams),
        status=[STATUS_NAMES[s] for s in status],
        epochs=epochs,
        train_loss=history.train_loss[members, last],
        train_acc=history.train_acc[members, last],
        test_loss=test_loss,
        test_acc=test_acc,
        history=history,
        state=state,
    )
