"""Time left in a sweep: a cost model of its budget, calibrated at the start, then measured.

Search: every trial trains `epochs` epochs of its configuration's `seeds` seeds (one pack),
computes each seed's objective at its due epochs, and pays Ray's per-trial overhead; `slots`
trials run at once. Evaluation: every seed of the top configurations is evaluated, `eval_slots`
at a time. So

    search_left     = (epochs_left x epoch_s + objectives_left x objective_s + trials_left x overhead_s) / slots
    evaluation_left = ceil(evaluations_left / eval_slots) x evaluation_s

Before the first epoch the rates come from `calibrate`, on the driver: a few timed training
steps of one model of the first configuration, one real objective computation, both times the
seeds of a trial (a pack of N costs about N models on a CPU, README) and times the slowdown of a
training step when as many models train at once as trials share a node (timed with that many
threads: 1.07x for two on the 2-core VM, where two `raven train` processes measure 1.08x). The
default sweeps' trials still ran 1.12x (first run) and 1.5x (second run, another VM) slower per
epoch than this calibration: a pack of one's loop with its per-epoch checkpoint costs 1.14x over
`raven train`, and the rest is not yet found; the estimate is refined from the first measured
epochs on (the second run's was within 15 % after its first two trials). The evaluation scaled
from the objective by its attack work (images x steps x attacks x budgets; the objective timed
again with an evaluation task's threads, which a lone evaluation has more of) plus the strong
protocol and t-SNE at the rates below, and FID at the rate of its Inception network timed here
on one batch (one pass when the test images' statistics are cached, two otherwise). Every measured epoch (Tune's time_this_iter_s), objective
(`objective_seconds`) and evaluation then replaces the calibrated figure with the running mean,
so the estimate converges as the sweep runs. On a cluster with GPUs the calibration runs on the
driver's CPU and overestimates until the first epochs arrive.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, replace

import torch

from raven.data import DataSplits
from raven.eval.evaluate import TEST_IMAGES
from raven.eval.fid import InceptionFeatures, default_cache_dir, fid_available, reference_cached
from raven.progress import duration
from raven.step import build_model, make_optimizer, train_step, validation_metrics
from raven.sweep.selection import validation_objective
from raven.sweep.spec import SweepSpec

# Measured rates (reports/bench/README.md, cluster/README.md): Ray Tune's per-trial overhead (sweeps/ray_overhead.py,
# local Ray on the 2-core development machine), sklearn's t-SNE (about 50 s for 1,000 clean + 1,000
# noisy points on the CPU of the lent H100 machine). FID's Inception is timed on this machine
# (`fid_image_seconds`); FID_SECONDS_PER_IMAGE_CPU stands in only where the network is missing.
RAY_TRIAL_OVERHEAD_S = 4.0
TSNE_SECONDS_PER_POINT = 0.025
FID_SECONDS_PER_IMAGE_CPU = 0.09  # FastInception, one thread of the 2-core machine (10,000 images in 14.4 min)
# The strong protocol (per-iterate PGD, 5 attacks x 100 steps x 2 restarts, then AutoAttack on the images left)
# per test image and budget, one thread of the 2-core machine: 1,000 images x 8 budgets took 710 s on the default
# sweep's sigma_aug = 0.01 RAVEN (reports/sigma-aug-mnist), 260-370 s on the converged MNIST VAEs of
# reports/cpu-converged. The robust model's rate: AutoAttack's share grows with the images that survive PGD.
STRONG_SECONDS_PER_IMAGE_DELTA_CPU = 0.09
# Its convergence check (raven.eval.protocols.bite_checks: every attack again with doubled steps, then doubled
# restarts, on the images still standing) over the protocol itself, on the same images: 804 s / 260 s and
# 1,383 s / 339 s on seed 0 of the converged MNIST VAE and VAE (noise) (reports/cpu-converged). Left out of the
# first default sweep's estimate, it made the evaluation stage 3-4x longer than predicted.
STRONG_CHECK_FACTOR = 3.6
_CALIBRATION_STEPS = 6
_FID_CALIBRATION_IMAGES = 50


@dataclass(frozen=True)
class Rates:
    """Seconds per unit of work: a trial epoch (training and validation of all its seeds), a trial's objective
    (all its seeds), one evaluation (one model)."""

    epoch_s: float
    objective_s: float
    evaluation_s: float
    overhead_s: float = RAY_TRIAL_OVERHEAD_S
    eval_speedup: float = 1.0  # a trial's objective time alone over an evaluation task's (more threads)
    fid_image_s: float | None = None  # Inception seconds per image with the evaluation's threads (None: unknown)
    fid_passes: int = 2  # the reconstructions, and the test images unless their statistics are cached
    contention: float = 1.0  # a training step with the node's trials running at once, over one alone


def objective_epochs(spec: SweepSpec) -> int:
    """How many epochs of a trial compute the objective."""
    settings = spec.objective_settings
    return sum(1 for epoch in range(1, spec.epochs + 1) if settings.due(epoch, spec.epochs))


def fid_image_seconds(threads: int) -> float | None:
    """Seconds per image of FID's Inception features on this CPU with `threads` threads, from one timed batch
    after a warm-up one; None when the network is not installed."""
    if not fid_available()[0]:
        return None
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        extractor = InceptionFeatures("cpu", batch_size=_FID_CALIBRATION_IMAGES, progress=False)
        images = torch.rand(2 * _FID_CALIBRATION_IMAGES, 784, generator=torch.Generator().manual_seed(0))
        extractor(images[:_FID_CALIBRATION_IMAGES])  # loads the network and warms its kernels up
        started = time.perf_counter()
        extractor(images[_FID_CALIBRATION_IMAGES:])
        return (time.perf_counter() - started) / _FID_CALIBRATION_IMAGES
    finally:
        torch.set_num_threads(previous)


def step_seconds(config, x: torch.Tensor, steps: int, copies: int = 1) -> float:
    """Mean seconds per training step of one model of `config` on the batch `x` while `copies` models train at
    once, each on its own thread (after two warm-up steps each): what one trial's step costs beside the others on
    its node, whose products compete for the same caches and memory bandwidth."""
    barrier = threading.Barrier(copies)
    seconds = [math.nan] * copies

    def train(index: int) -> None:
        model = build_model(config)
        optimizer = make_optimizer(model.parameters(), config.lr)
        generator = torch.Generator().manual_seed(index)
        for _ in range(2):  # allocators and kernels warm up
            train_step(model, optimizer, config, x, generator)
        barrier.wait()
        started = time.perf_counter()
        for _ in range(steps):
            train_step(model, optimizer, config, x, generator)
        seconds[index] = (time.perf_counter() - started) / steps

    if copies == 1:
        train(0)
    else:
        workers = [threading.Thread(target=train, args=(i,)) for i in range(copies)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    return sum(seconds) / copies


def calibrate(spec: SweepSpec, splits: DataSplits, eval_on_gpu: bool, eval_threads: int | None = None,
              concurrent: int = 1) -> Rates:
    """Rates from a few seconds of real work on this process's CPU (see the module docstring): training and the
    objective with a trial's threads, the objective again and FID's Inception with an evaluation task's.
    `concurrent`: trials that share this node's CPUs at once; the training steps are timed with that many
    running together, and the search's rates slowed by what that costs over one alone."""
    threads = torch.get_num_threads()
    trial_threads = max(1, int(spec.cpus_per_trial))
    eval_threads = max(1, eval_threads or trial_threads)
    torch.set_num_threads(trial_threads)
    try:
        config = spec.train_config(spec.initial[0] if spec.initial else spec.space.middle)
        model = build_model(config)
        x = splits.train_x[:config.batch_size]
        alone = step_seconds(config, x, _CALIBRATION_STEPS)
        # Trials on one node slow each other through shared caches and memory (two on the 2-core VM: 1.07x).
        contention = step_seconds(config, x, _CALIBRATION_STEPS, concurrent) / alone if concurrent > 1 else 1.0
        train_images = min(len(splits.train_x), spec.limit or len(splits.train_x))
        steps_per_epoch = math.ceil(train_images / config.batch_size)
        started = time.perf_counter()
        validation_metrics(model, config, splits.val_x[:1000])
        validation_s = (time.perf_counter() - started) * len(splits.val_x) / 1000
        epoch_s = (steps_per_epoch * alone + validation_s) * contention
        started = time.perf_counter()
        validation_objective(model, splits, spec.objective_settings)
        objective_alone = time.perf_counter() - started
        eval_objective_s = objective_alone
        if eval_threads != trial_threads:
            torch.set_num_threads(eval_threads)
            started = time.perf_counter()
            validation_objective(model, splits, spec.objective_settings)
            eval_objective_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    fid_s, passes = None, 2
    evaluation = spec.eval_config
    if evaluation.fid and not eval_on_gpu:
        fid_s = fid_image_seconds(eval_threads)
        images = splits.test_x[:evaluation.fid_images or evaluation.limit or len(splits.test_x)]
        passes = 1 if fid_s is not None and reference_cached(images.cpu(), default_cache_dir()) else 2
    objective_s = objective_alone * contention  # a trial's, beside the others
    rates = Rates(spec.seeds * epoch_s, spec.seeds * objective_s, 0.0,
                  eval_speedup=objective_alone / max(eval_objective_s, 1e-9), fid_image_s=fid_s,
                  fid_passes=passes, contention=contention)
    return replace(rates, evaluation_s=evaluation_estimate(spec, objective_s, eval_on_gpu, rates))


def evaluation_estimate(spec: SweepSpec, objective_s: float, on_gpu: bool, rates: Rates | None = None) -> float:
    """One full evaluation (one model): the attacks scaled from one model's objective (`objective_s`, with a trial's
    threads beside the other trials; `rates.contention` and `rates.eval_speedup` turn it into the evaluation
    task's, alone with its threads) by the attack work, the strong protocol and
    its convergence check at the measured rates, plus t-SNE and FID (at
    `rates.fid_image_s` per image and pass, timed on this machine, else FID_SECONDS_PER_IMAGE_CPU)."""
    settings, evaluation = spec.objective_settings, spec.eval_config
    rates = rates or Rates(0.0, 0.0, 0.0)
    objective_work = settings.val_limit * settings.steps * len(settings.attacks) * len(settings.deltas)
    images = evaluation.limit or TEST_IMAGES
    budgets = sum(1 for d in evaluation.deltas if d > 0)
    seconds = 0.0
    if evaluation.runs_paper:
        seconds += (objective_s / rates.contention / rates.eval_speedup) * images * evaluation.steps \
            * len(evaluation.attacks) * budgets / objective_work
    if evaluation.runs_strong and not on_gpu:
        strong_images = evaluation.strong_images(images)
        protocol = STRONG_SECONDS_PER_IMAGE_DELTA_CPU * strong_images * budgets / rates.eval_speedup
        checked = min(strong_images, evaluation.strong.check_images or strong_images)
        seconds += protocol * (1 + (STRONG_CHECK_FACTOR * checked / strong_images if evaluation.strong.convergence
                                    else 0.0))
    if evaluation.tsne:
        seconds += TSNE_SECONDS_PER_POINT * 2 * min(evaluation.tsne_points, images)
    if evaluation.fid and not on_gpu:
        per_image = rates.fid_image_s if rates.fid_image_s is not None else FID_SECONDS_PER_IMAGE_CPU
        seconds += per_image * rates.fid_passes * (evaluation.fid_images or images)
    return seconds


@dataclass
class SweepClock:
    """The sweep's budget and what is done; `left()` is the estimate of the module docstring."""

    trials: int
    epochs: int
    objectives_per_trial: int
    slots: int
    evaluations: int
    eval_slots: int
    rates: Rates
    epochs_done: dict[str, int] = field(default_factory=dict)  # trial id -> epochs it has finished
    trials_done: set[str] = field(default_factory=set)
    objectives_done: int = 0
    evaluations_done: int = 0
    _epoch_walls: list[float] = field(default_factory=list)
    _objective_walls: list[float] = field(default_factory=list)
    _evaluation_walls: list[float] = field(default_factory=list)
    _stage_started: float | None = None  # when the evaluation stage began

    @classmethod
    def for_spec(cls, spec: SweepSpec, rates: Rates, slots: int, eval_slots: int) -> "SweepClock":
        trials = spec.num_samples
        return cls(trials=trials, epochs=spec.epochs, objectives_per_trial=objective_epochs(spec),
                   slots=max(1, min(slots, spec.max_concurrent or slots, trials)),
                   evaluations=spec.evaluate_top * spec.seeds, eval_slots=max(1, eval_slots), rates=rates)

    @property
    def trial_epochs_total(self) -> int:
        return self.trials * self.epochs

    @property
    def trial_epochs_done(self) -> int:
        return sum(self.epochs if t in self.trials_done else n for t, n in self.epochs_done.items())

    def epoch(self, trial_id: str, epoch: int, wall_s: float | None, objective_s: float | None) -> None:
        """A trial reported `epoch`, taking `wall_s` seconds, `objective_s` of them for the objective."""
        if epoch <= self.epochs_done.get(trial_id, 0):
            return  # a restored trial re-reporting its last epoch
        self.epochs_done[trial_id] = epoch
        if objective_s is not None:
            self.objectives_done += 1
            self._objective_walls.append(objective_s)
        if wall_s is not None and wall_s > 0:
            self._epoch_walls.append(wall_s - (objective_s or 0.0))

    def trial_finished(self, trial_id: str) -> None:
        self.trials_done.add(trial_id)

    def evaluation_stage(self, evaluations: int) -> None:
        """The search is over: `evaluations` evaluations are about to run."""
        self.evaluations = evaluations
        self._stage_started = time.monotonic()

    def evaluation_finished(self, seconds: float) -> None:
        self.evaluations_done += 1
        self._evaluation_walls.append(seconds)
        self._stage_started = time.monotonic()

    def measured(self) -> Rates:
        mean = lambda values, fallback: sum(values) / len(values) if values else fallback  # noqa: E731
        r = self.rates
        return replace(r, epoch_s=mean(self._epoch_walls, r.epoch_s), objective_s=mean(self._objective_walls,
                       r.objective_s), evaluation_s=mean(self._evaluation_walls, r.evaluation_s))

    def search_left(self) -> float:
        r = self.measured()
        epochs_left = max(0, self.trial_epochs_total - self.trial_epochs_done)
        objectives_left = max(0, self.trials * self.objectives_per_trial - self.objectives_done)
        trials_left = max(0, self.trials - len(self.trials_done))
        started = sum(1 for t in self.epochs_done if t not in self.trials_done)  # overhead already paid
        return (epochs_left * r.epoch_s + objectives_left * r.objective_s
                + max(0, trials_left - started) * r.overhead_s) / self.slots

    def evaluation_left(self) -> float:
        r = self.measured()
        waves = math.ceil(max(0, self.evaluations - self.evaluations_done) / self.eval_slots)
        left = waves * r.evaluation_s
        if self._stage_started is not None and waves:
            left = max(0.05 * left, left - (time.monotonic() - self._stage_started))
        return left

    def left(self) -> float:
        return (self.search_left() if self._stage_started is None else 0.0) + self.evaluation_left()

    def text(self) -> str:
        return f"~{duration(self.left())} left"
